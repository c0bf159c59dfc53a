"""The strict check of a DSN, as built or as sent, and the originals to put DSNs through.

`check_dsn` asks of one DSN what a strict receiver and a recipient's mail reader
would: the envelope options it needs and no more (BODY=8BITMIME exactly for 8-bit
content, SMTPUTF8 exactly for a UTF-8 envelope or header), no line over 998
octets, a bounded size; parsed with Python's `email` package (policy SMTPUTF8)
without defects, a ``multipart/report`` of three parts whose types follow RFC
3464 and RFC 6533 (the ``global-`` types exactly when needed), address types
that match the addresses, and the actions and Remote-MTA the caller expects.

Used by tests/unit/test_dsn_validity.py (DSNs built directly) and
tests/integration/test_dsn_validity.py (DSNs a real ``backupmx serve`` sent).
"""

from __future__ import annotations

import email
import email.policy
from dataclasses import dataclass
from email.message import EmailMessage

from backupmx.bounce.dsn import (
    MAX_LINE,
    RETURN_HEADERS_LIMIT,
    RETURN_SIZE_LIMIT,
    is_8bit,
    needs_smtputf8,
)
from tests.support.primary_sink import transport_problem

HOSTNAME = "mx2.backup.test"  # the reporting MTA of the DSNs checked
# Bigger than anything legitimate: the bound on a DSN, returned original included.
DSN_SIZE_BOUND = max(RETURN_HEADERS_LIMIT, RETURN_SIZE_LIMIT) + 8 * 1024

# --------------------------------------------------------------------------- originals

ASCII_HEADERS = (
    b"From: Alice <alice@sender.test>\r\n"
    b"To: bob@example.test\r\n"
    b"Subject: plain\r\n"
    b"Message-ID: <m1@sender.test>\r\n"
)
EIGHT_BIT = ASCII_HEADERS + b"\r\nUTF-8: \xe2\x82\xac, Latin-1: \xff\r\n"
UTF8 = (
    "From: Jürgen <jürgen@sender.test>\r\n"
    "To: bäd@example.test\r\n"
    "Subject: Grüße aus Köln\r\n"
    "Message-ID: <m2@sender.test>\r\n"
    "\r\n"
    "Grüße\r\n"
).encode()
LONG_HEADERS = (
    ASCII_HEADERS
    + b"X-Long: "
    + b"x" * 2_000_000
    + b"\r\nX-Words: "
    + b"word " * 400_000
    + b"\r\n\r\nbody\r\n"
)
LONG_BODY_LINE = ASCII_HEADERS + b"\r\nshort\r\n" + b"y" * 5000 + b"\r\nend\r\n"


# --------------------------------------------------------------------------- the check


@dataclass(frozen=True)
class Expected:
    """What one DSN must say."""

    to: str  # the envelope recipient: the original sender
    actions: dict[str, str]  # final recipient -> action
    smtputf8_original: bool = False  # the original was sent with SMTPUTF8
    full: bool = False  # the whole original comes back
    remote_mta: str | None = "mx1.example.test"  # None: no Remote-MTA field
    orcpt: dict[str, str] | None = None  # final recipient -> Original-Recipient value
    reporting_mta: str = HOSTNAME


@dataclass(frozen=True)
class Checked:
    message: EmailMessage
    notification: str
    status: list[EmailMessage]  # per-message block, then one per recipient
    returned_type: str


def raw_parts(content: bytes, boundary: str) -> list[tuple[bytes, bytes]]:
    """(header section, body) of each body part, from the bytes themselves."""
    chunks = content.split(b"\r\n--" + boundary.encode())
    assert chunks[-1] == b"--\r\n", chunks[-1][:100]
    parts = []
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n")
        head, _, body = chunk[2:].partition(b"\r\n\r\n")
        parts.append((head, body))
    return parts


def status_blocks(status: bytes) -> list[EmailMessage]:
    """The blocks of a (global-)delivery-status body, each parsed as header fields."""
    blocks = [
        email.message_from_bytes(block, policy=email.policy.SMTPUTF8)
        for block in status.rstrip(b"\r\n").split(b"\r\n\r\n")
    ]
    assert all(isinstance(block, EmailMessage) for block in blocks)
    return blocks  # type: ignore[return-value]


def reported_actions(blocks: list[EmailMessage]) -> dict[str, str]:
    """Final recipient (the address alone) -> action, from the per-recipient blocks."""
    return {
        str(block["Final-Recipient"]).partition("; ")[2]: str(block["Action"])
        for block in blocks[1:]
    }


def check_dsn(content: bytes, options: tuple[str, ...], expected: Expected) -> Checked:
    """The strict check of one DSN as sent (envelope ``options``) or as built."""
    assert transport_problem("", [expected.to], options, content) is None
    # Declared exactly when needed: not 7-bit while 8-bit, not SMTPUTF8 without need.
    assert ("BODY=8BITMIME" in options) == is_8bit(content), options
    assert ("SMTPUTF8" in options) == needs_smtputf8(content, expected.to), options
    assert len(content) <= DSN_SIZE_BOUND, len(content)
    assert max(len(line) for line in content.split(b"\r\n")) <= MAX_LINE

    message = email.message_from_bytes(content, policy=email.policy.SMTPUTF8)
    assert isinstance(message, EmailMessage)
    assert not message.defects, message.defects
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["To"] == expected.to
    boundary = message.get_boundary()
    assert boundary is not None
    (text_head, text), (status_head, status), (returned_head, returned) = raw_parts(
        content, boundary
    )
    types = [part.get_content_type() for part in message.iter_parts()]

    assert types[0] == "text/plain"
    notification = next(message.iter_parts()).get_content()  # type: ignore[attr-defined]

    # RFC 6533: the global type exactly when the report is not ASCII.
    assert types[1] == f"message/{'' if status.isascii() else 'global-'}delivery-status"
    blocks = status_blocks(status)
    assert blocks[0]["Reporting-MTA"] == f"dns; {expected.reporting_mta}"
    for block in blocks[1:]:
        addr_type, _, address = str(block["Final-Recipient"]).partition("; ")
        assert addr_type == ("rfc822" if address.isascii() else "utf-8"), block["Final-Recipient"]
        if expected.remote_mta and block["Action"] != "delayed":
            assert block["Remote-MTA"] == f"dns; {expected.remote_mta}"
        else:
            assert block["Remote-MTA"] is None
        if expected.orcpt and address in expected.orcpt:
            assert block["Original-Recipient"] == expected.orcpt[address]
    assert reported_actions(blocks) == expected.actions

    full_type = "message/global" if expected.smtputf8_original else "message/rfc822"
    headers_type = "message/global-headers" if expected.smtputf8_original else "text/rfc822-headers"
    assert types[2] == (full_type if expected.full else headers_type), types
    for head, body in ((text_head, text), (status_head, status), (returned_head, returned)):
        assert (b"Content-Transfer-Encoding: 8bit" in head) == is_8bit(body), head
    return Checked(message, notification, blocks, types[2])
