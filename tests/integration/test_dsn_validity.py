"""Every DSN backupmx sends is valid: envelope, MIME types, address types, lines, size.

The strict check (`check_dsn`) is applied twice:

* to DSNs built directly (`build_dsn`, `Notices`) for every kind, RET=FULL and
  RET=HDRS, 8-bit and UTF-8 originals, UTF-8 senders and recipients, and the
  hostile cases (a 2 MB header line, a 5,000-octet body line);
* end to end: a real ``backupmx serve`` delivers to an aiosmtpd primary that
  refuses, defers and takes recipients (mx1.example.test from dnsmasq), and the
  DSNs it queues go to `StrictSink` receivers (the senders' MX, and the address
  literal ``[127.0.0.1]``), which refuse 8-bit content without BODY=8BITMIME and
  UTF-8 envelopes or headers without SMTPUTF8.  Every DSN must be accepted.

Each DSN is parsed back with Python's `email` package (policy SMTPUTF8), as a
recipient's mail reader would.
"""

from __future__ import annotations

import email
import email.policy
import random
import smtplib
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any, TypeVar

import pytest

from backupmx.bounce.dsn import (
    MAX_LINE,
    RETURN_HEADERS_LIMIT,
    RETURN_SIZE_LIMIT,
    Action,
    RecipientReport,
    build_dsn,
    is_8bit,
    needs_smtputf8,
)
from backupmx.bounce.notices import Notices
from backupmx.deliver.client import Target
from backupmx.deliver.route import Bounce, Defer, Identity, RoutePlan, plan, route_literal
from backupmx.mail.reply import bounced, classify, deferred
from backupmx.queue.records import Claim, Outbound
from tests.support.dns_server import Dnsmasq, dns_zone
from tests.support.ports import free_port
from tests.support.primary_sink import PickyPrimary, StrictSink, Transaction, transport_problem
from tests.support.server import ServerProcess

T = TypeVar("T")

ARRIVED = datetime(2025, 3, 1, 8, 0, 0, tzinfo=UTC)
NOW = datetime(2025, 3, 2, 9, 30, 0, tzinfo=UTC)
HOSTNAME = "mx2.backup.test"
REMOTE = Target("mx1.example.test", "127.0.0.2", 25)
# Bigger than anything legitimate: the bound on a DSN, returned original included.
DSN_SIZE_BOUND = max(RETURN_HEADERS_LIMIT, RETURN_SIZE_LIMIT) + 8 * 1024

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
    assert blocks[0]["Reporting-MTA"] == f"dns; {HOSTNAME}"
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


def built(original: bytes, reports: list[RecipientReport], **changes: Any) -> bytes:
    arguments: dict[str, Any] = {
        "reporting_mta": HOSTNAME,
        "sender": "alice@sender.test",
        "queue_id": "Q123",
        "arrival_date": ARRIVED,
        "original": original,
        "recipients": reports,
        "date": NOW,
        "envid": "E1",
    }
    arguments.update(changes)
    return build_dsn(**arguments)


def options_for(dsn: bytes, to: str) -> tuple[str, ...]:
    """The MAIL parameters `Notices` gives a DSN, as the deliverer sends them."""
    return ("BODY=8BITMIME",) * is_8bit(dsn) + ("SMTPUTF8",) * needs_smtputf8(dsn, to)


def report(address: str, action: Action, orcpt: str | None = None) -> RecipientReport:
    status = {Action.FAILED: "5.1.1", Action.DELAYED: "4.4.1"}.get(action, "2.0.0")
    return RecipientReport(
        address,
        action,
        status,
        original_recipient=orcpt,
        remote_mta=None if action is Action.DELAYED else REMOTE.host,
        remote_host=str(REMOTE),
        diagnostic=f"{status[0]}50 {status} said so",
    )


# --------------------------------------------------------------------------- built directly

KINDS = [Action.FAILED, Action.DELAYED, Action.RELAYED]
ORIGINALS = {"8-bit": (EIGHT_BIT, False), "utf-8": (UTF8, True)}


@pytest.mark.parametrize("action", KINDS)
@pytest.mark.parametrize("ret", ["FULL", "HDRS"])
@pytest.mark.parametrize("original", list(ORIGINALS))
@pytest.mark.parametrize("sender", ["alice@sender.test", "jürgen@sender.test"])
@pytest.mark.parametrize("recipient", ["bob@example.test", "bäd@example.test"])
def test_every_kind_of_dsn_passes_the_strict_check(
    action: Action, ret: str, original: str, sender: str, recipient: str
) -> None:
    content, smtputf8 = ORIGINALS[original]
    dsn = built(content, [report(recipient, action)], sender=sender, ret=ret, smtputf8=smtputf8)
    expected = Expected(
        sender,
        {recipient: str(action)},
        smtputf8_original=smtputf8,
        full=action is Action.FAILED and ret == "FULL",
    )
    checked = check_dsn(dsn, options_for(dsn, sender), expected)
    if checked.returned_type in ("message/rfc822", "message/global"):
        inner = checked.message.get_payload()[2].get_payload(0)  # type: ignore[index]
        assert inner["Message-ID"] in ("<m1@sender.test>", "<m2@sender.test>")


def test_a_utf8_recipient_is_a_utf8_address_in_a_global_delivery_status() -> None:
    orcpt = "utf-8;b\\x{E4}d+2Bx@example.test"  # RFC 6533 utf-8-addr-xtext, as ORCPT
    dsn = built(UTF8, [report("bäd@example.test", Action.FAILED, orcpt)], smtputf8=True)
    assert b"Final-Recipient: utf-8; b\xc3\xa4d@example.test\r\n" in dsn
    assert b"Original-Recipient: utf-8;b\\x{E4}d+x@example.test\r\n" in dsn
    assert b"Content-Type: message/global-delivery-status\r\n" in dsn
    # An rfc822 ORCPT that decodes to UTF-8 becomes utf-8-addr-unitext (RFC 6533 §3).
    odd = built(UTF8, [report("bäd@example.test", Action.FAILED, "rfc822;b+C3+A4d+2B1@x.test")])
    assert b"Original-Recipient: utf-8;b\xc3\xa4d\\x{2B}1@x.test\r\n" in odd


def test_an_ascii_dsn_keeps_the_plain_types_and_needs_nothing() -> None:
    plain = ASCII_HEADERS + b"\r\nhello\r\n"
    dsn = built(plain, [report("bob@example.test", Action.FAILED)], ret="FULL")
    assert not is_8bit(dsn) and not needs_smtputf8(dsn, "alice@sender.test")
    check_dsn(dsn, (), Expected("alice@sender.test", {"bob@example.test": "failed"}, full=True))


def test_remote_mta_is_the_dns_name_and_the_address_stays_in_the_text() -> None:
    dsn = built(EIGHT_BIT, [report("bob@example.test", Action.FAILED)])
    checked = check_dsn(
        dsn,
        options_for(dsn, "alice@sender.test"),
        Expected("alice@sender.test", {"bob@example.test": "failed"}),
    )
    assert checked.status[1]["Remote-MTA"] == "dns; mx1.example.test"
    assert "host mx1.example.test[127.0.0.2]:25 said:" in checked.notification


@pytest.mark.parametrize("ret", ["FULL", "HDRS"])
def test_a_2mb_header_line_gives_a_bounded_dsn_and_says_what_was_cut(ret: str) -> None:
    started = time.monotonic()
    dsn = built(LONG_HEADERS, [report("bob@example.test", Action.FAILED)], ret=ret)
    assert time.monotonic() - started < 1.0
    checked = check_dsn(
        dsn,
        options_for(dsn, "alice@sender.test"),
        Expected("alice@sender.test", {"bob@example.test": "failed"}),
    )
    assert len(dsn) <= RETURN_HEADERS_LIMIT + 4096
    text = " ".join(checked.notification.split())
    assert "longer than 64 KiB; only their first 64 KiB are attached" in text
    assert "1 line(s) of your message are longer than 998 octets" in text
    returned = dsn.split(b"Content-Type: text/rfc822-headers\r\n\r\n", 1)[1]
    assert returned.startswith(ASCII_HEADERS)  # the fields before the long ones, intact
    assert b"X-Long: \r\n " not in returned and b"X-Long:" in returned
    # X-Words is folded at its spaces (RFC 5322 §2.2.3), never cut inside a word.
    folded = returned.split(b"X-Words:", 1)[1].split(b"\r\n--", 1)[0]
    assert set(folded.replace(b"\r\n", b"").split()) == {b"word"}


def test_a_long_body_line_of_a_returned_original_is_cut_and_said() -> None:
    dsn = built(LONG_BODY_LINE, [report("bob@example.test", Action.FAILED)], ret="FULL")
    checked = check_dsn(
        dsn, (), Expected("alice@sender.test", {"bob@example.test": "failed"}, full=True)
    )
    assert b"\r\n" + b"y" * MAX_LINE + b"\r\nend\r\n" in dsn
    assert "1 line(s) of your message are longer than 998 octets" in " ".join(
        checked.notification.split()
    )


def test_a_cut_never_splits_a_utf8_character() -> None:
    original = b"Subject: " + "ä".encode() * 1000 + b"\r\n\r\nx\r\n"
    dsn = built(original, [report("bob@example.test", Action.FAILED)], smtputf8=True)
    returned = dsn.split(b"Content-Type: message/global-headers\r\n", 1)[1]
    returned.split(b"\r\n--", 1)[0].decode("utf-8")  # raises on a split sequence


# --------------------------------------------------------------------------- Notices


def outbound(
    sender: str, body: bytes, *, smtputf8: bool = False, ret: str | None = None
) -> Outbound:
    return Outbound("Q1", sender, body, len(body), "8BITMIME", smtputf8, ret, None, ARRIVED)


def claim(address: str, notify: str | None = None) -> Claim:
    domain = address.rpartition("@")[2]
    return Claim(1, "Q1", address, domain, 1, notify, None)


@pytest.mark.parametrize(
    ("sender", "body", "smtputf8", "body_type", "dsn_smtputf8"),
    [
        ("alice@sender.test", ASCII_HEADERS + b"\r\nhi\r\n", False, "7BIT", False),
        ("alice@sender.test", EIGHT_BIT, False, "8BITMIME", False),
        ("alice@sender.test", UTF8, True, "8BITMIME", False),
        ("jürgen@sender.test", UTF8, True, "8BITMIME", True),
    ],
)
def test_notices_queue_the_dsn_with_the_body_and_smtputf8_it_needs(
    sender: str, body: bytes, smtputf8: bool, body_type: str, dsn_smtputf8: bool
) -> None:
    (notice,) = Notices(HOSTNAME).for_results(
        outbound(sender, body, smtputf8=smtputf8, ret="FULL"),
        [claim("bob@example.test")],
        [bounced("550 5.1.1 unknown user", "5.1.1")],
        REMOTE,
        True,
    )
    assert notice.sender == ""
    assert (notice.body_type, notice.smtputf8) == (body_type, dsn_smtputf8)
    assert [(r.address, r.domain) for r in notice.recipients] == [(sender, "sender.test")]


def test_notices_name_the_remote_mta_by_name_never_by_address() -> None:
    message = outbound("alice@sender.test", EIGHT_BIT)
    failure = [bounced("550 5.1.1 unknown user", "5.1.1")]
    by_name = Notices(HOSTNAME).for_results(message, [claim("b@x.test")], failure, REMOTE, True)
    assert b"Remote-MTA: dns; mx1.example.test\r\n" in by_name[0].body.read()
    literal = Target("127.0.0.2", "127.0.0.2", 27027)
    by_address = Notices(HOSTNAME).for_results(message, [claim("b@x.test")], failure, literal, True)
    body = by_address[0].body.read()
    assert b"Remote-MTA" not in body
    assert b"host 127.0.0.2[127.0.0.2]:27027 said: 550" in body


def test_an_address_literal_sender_gets_its_dsn_routed_to_the_literal() -> None:
    message = outbound("user@[127.0.0.1]", EIGHT_BIT)
    (notice,) = Notices(HOSTNAME).for_results(
        message, [claim("b@x.test")], [bounced("550 5.1.1 no", "5.1.1")], REMOTE, True
    )
    assert [(r.address, r.domain) for r in notice.recipients] == [
        ("user@[127.0.0.1]", "[127.0.0.1]")
    ]


@pytest.mark.parametrize(
    ("sender", "notify"), [("", None), ("", "SUCCESS,FAILURE"), ("alice@sender.test", "NEVER")]
)
def test_no_dsn_to_the_null_sender_hence_no_double_bounce_nor_with_notify_never(
    sender: str, notify: str | None
) -> None:
    notices = Notices(HOSTNAME).for_results(
        outbound(sender, EIGHT_BIT),
        [claim("b@x.test", notify), claim("c@x.test", notify)],
        [bounced("550 5.1.1 no", "5.1.1"), classify(250, "2.0.0 Ok")],
        REMOTE,
        False,
    )
    assert notices == []


def test_a_deferral_is_no_dsn_of_its_own() -> None:
    notices = Notices(HOSTNAME).for_results(
        outbound("alice@sender.test", EIGHT_BIT),
        [claim("b@x.test")],
        [deferred("451 later")],
        REMOTE,
        True,
    )
    assert notices == []


# --------------------------------------------------------------------------- route


IDENTITY = Identity.of(HOSTNAME, [], [], [])


@pytest.mark.parametrize(
    ("literal", "address"), [("[127.0.0.1]", "127.0.0.1"), ("[ipv6:2001:db8::1]", "2001:db8::1")]
)
def test_an_address_literal_routes_to_its_address_on_the_delivery_port(
    literal: str, address: str
) -> None:
    route = route_literal(literal, IDENTITY, 2525)
    assert isinstance(route, RoutePlan)
    assert [(h.address, h.port) for h in route.hops] == [(address, 2525)]


def test_an_address_literal_of_this_host_defers_and_a_bad_one_bounces() -> None:
    ours = Identity.of(HOSTNAME, [], [], ["192.0.2.1"])
    assert isinstance(route_literal("[192.0.2.1]", ours, 25), Defer)
    assert isinstance(route_literal("[300.1.2.3]", ours, 25), Bounce)


async def test_plan_routes_an_address_literal_without_dns() -> None:
    class NoDns:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"DNS asked ({name}) for an address literal")

    route = await plan("[127.0.0.1]", NoDns(), IDENTITY, (), 2525, random.Random(1))  # type: ignore[arg-type]
    assert isinstance(route, RoutePlan) and route.hops[0].address == "127.0.0.1"


# --------------------------------------------------------------------------- the strict sink


def test_the_strict_sink_refuses_what_a_strict_receiver_would() -> None:
    port = free_port()
    sink = StrictSink("127.0.0.1", port).start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("client.test")
            client.mail("")
            client.rcpt("alice@sender.test")
            code, _ = client.data(b"Subject: x\r\n\r\n\xc3\xa9\r\n")  # no BODY=8BITMIME
            assert code == 554
            client.rset()
            client.mail("", ["BODY=8BITMIME"])
            client.rcpt("alice@sender.test")
            code, _ = client.data(b"Subject: \xc3\xa9\r\n\r\nx\r\n")  # no SMTPUTF8
            assert code == 554
            client.rset()
            client.mail("", ["BODY=8BITMIME"])
            client.rcpt("alice@sender.test")
            code, _ = client.data(b"Subject: x\r\n\r\n" + b"z" * 999 + b"\r\n")
            assert code == 554
            client.rset()
            client.mail("", ["BODY=8BITMIME", "SMTPUTF8"])
            client.rcpt("jürgen@sender.test")
            code, _ = client.data(b"To: j\xc3\xbcrgen@sender.test\r\n\r\n\xc3\xa9\r\n")
            assert code == 250
    finally:
        sink.stop()
    assert len(sink.refused) == 3 and len(sink.received) == 1


# --------------------------------------------------------------------------- backupmx serve

PRIMARY = "127.0.0.2"  # mx1.example.test
SENDERS_MX = "127.0.0.4"  # mx.sender.test
LITERAL = "127.0.0.1"  # user@[127.0.0.1]
ZONE = """\
local=/test/
mx-host=example.test,mx1.example.test,10
mx-host=example.test,mx2.backup.test,20
host-record=mx1.example.test,127.0.0.2
host-record=mx2.backup.test,127.0.0.1
mx-host=sender.test,mx.sender.test,10
host-record=mx.sender.test,127.0.0.4
"""
NOTIFY_ALL = "NOTIFY=SUCCESS,FAILURE,DELAY"
WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class Sent:
    envid: str
    sender: str
    options: tuple[str, ...]
    recipients: dict[str, str]  # address -> the action its DSN reports
    content: bytes

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.options

    @property
    def full(self) -> bool:
        return "RET=FULL" in self.options and len(self.content) <= RETURN_SIZE_LIMIT


def trio(bad: str, late: str, good: str) -> dict[str, str]:
    return {bad: "failed", late: "delayed", good: "relayed"}


ASCII_TRIO = trio("bad@example.test", "late@example.test", "good@example.test")
UTF8_TRIO = trio("bäd@example.test", "läte@example.test", "güt@example.test")
UTF8_OPTIONS = ("SMTPUTF8", "BODY=8BITMIME")
ALICE, JURGEN = "alice@sender.test", "jürgen@sender.test"
BAD = {"bad@example.test": "failed"}
MESSAGES = [
    Sent("8bit-full", ALICE, ("BODY=8BITMIME", "RET=FULL"), ASCII_TRIO, EIGHT_BIT),
    Sent("8bit-hdrs", ALICE, ("BODY=8BITMIME", "RET=HDRS"), ASCII_TRIO, EIGHT_BIT),
    Sent("utf8-full", ALICE, (*UTF8_OPTIONS, "RET=FULL"), UTF8_TRIO, UTF8),
    Sent("utf8-hdrs", ALICE, (*UTF8_OPTIONS, "RET=HDRS"), UTF8_TRIO, UTF8),
    Sent("sender-full", JURGEN, (*UTF8_OPTIONS, "RET=FULL"), ASCII_TRIO, UTF8),
    Sent("sender-hdrs", JURGEN, (*UTF8_OPTIONS, "RET=HDRS"), UTF8_TRIO, UTF8),
    Sent("literal", f"user@[{LITERAL}]", ("BODY=8BITMIME", "RET=FULL"), BAD, EIGHT_BIT),
    Sent("long-hdrs", ALICE, ("RET=HDRS",), BAD, LONG_HEADERS),
    Sent("long-full", ALICE, ("RET=FULL",), BAD, LONG_HEADERS),
    Sent("long-body", ALICE, ("RET=FULL",), BAD, LONG_BODY_LINE),
]


def wait_for(check: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    value = check()
    while not value:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}: {value!r}")
        time.sleep(0.2)
        value = check()
    return value


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    with dns_zone(tmp_path_factory.mktemp("dns"), ZONE) as server:
        yield server


def a_port() -> int:
    """One port free on every loopback address the test listens on (delivery.port)."""
    for _ in range(20):
        candidate = free_port(PRIMARY)
        try:
            for host in (SENDERS_MX, LITERAL):
                with socket.socket() as sock:
                    sock.bind((host, candidate))
        except OSError:
            continue
        return candidate
    raise RuntimeError("no port free on all the addresses")


def pending_late(server: ServerProcess) -> int:
    path = str(server.settings["database"]).removeprefix("sqlite:///")
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
        rows = db.execute(
            "SELECT count(*) FROM recipients WHERE attempts > 0 AND state = 'queued'"
        ).fetchall()
    return int(rows[0][0])


def status_of(content: bytes) -> bytes:
    """The body of a DSN's second part, the delivery status."""
    boundary = email.message_from_bytes(content).get_boundary()
    assert boundary is not None
    return raw_parts(content, boundary)[1][1]


def envid_of(transaction: Transaction) -> str:
    return str(status_blocks(status_of(transaction.content))[0]["Original-Envelope-Id"])


@pytest.mark.integration
def test_every_dsn_backupmx_sends_is_accepted_by_a_strict_receiver(
    server_factory: Any, dns: Dnsmasq
) -> None:
    port = a_port()
    refuse = {}
    for sent in MESSAGES:
        for address, action in sent.recipients.items():
            if action == "failed":
                refuse[address] = "550 5.1.1 no such user"
            elif action == "delayed":
                refuse[address] = "450 4.2.0 try again later"
    primary = PickyPrimary(PRIMARY, port, refuse, smtputf8=True).start()
    senders_mx = StrictSink(SENDERS_MX, port).start()
    literal = StrictSink(LITERAL, port).start()
    try:
        server: ServerProcess = server_factory(
            hostname=HOSTNAME,
            delivery={
                "port": port,
                "probe_interval": "1s",
                # Not retried before the restart below: housekeeping must find the late
                # recipients queued, not in the middle of another attempt.
                "retry_min": "60s",
                "retry_max": "60s",
                "delay_warning": "1s",
            },
            dns={"nameservers": [dns.nameserver], "timeout": "2s"},
            domain=[{"name": "example.test"}],
        ).start()
        with smtplib.SMTP(server.host, server.port, timeout=30) as client:
            client.ehlo("client.sender.test")
            for sent in MESSAGES:
                code, reply = client.mail(sent.sender, [*sent.options, f"ENVID={sent.envid}"])
                assert code == 250, reply
                for address in sent.recipients:
                    code, reply = client.rcpt(address, [NOTIFY_ALL])
                    assert code == 250, (address, reply)
                code, reply = client.data(sent.content)
                assert code == 250, (sent.envid, reply)
        immediate = sum(1 for s in MESSAGES for a in s.recipients.values() if a != "delayed")
        delayed = sum(1 for s in MESSAGES for a in s.recipients.values() if a == "delayed")
        wait_for(
            lambda: len(senders_mx.received) + len(literal.received) >= immediate,
            WAIT_SECONDS,
            "the failure and success DSNs",
        )
        wait_for(lambda: pending_late(server) >= delayed, WAIT_SECONDS, "a 450 for each late")
        # Delay warnings are queued by housekeeping, which runs at start-up.
        server.stop()
        server.start()
        wait_for(
            lambda: len(senders_mx.received) + len(literal.received) >= immediate + delayed,
            WAIT_SECONDS,
            "the delay DSNs",
        )
        time.sleep(1)  # nothing more may come
        server.stop()
    finally:
        primary.stop()
        senders_mx.stop()
        literal.stop()

    assert senders_mx.refused == [] and literal.refused == []
    assert len(senders_mx.received) + len(literal.received) == immediate + delayed
    by_envid: dict[str, list[Transaction]] = {}
    for transaction in senders_mx.received + literal.received:
        by_envid.setdefault(envid_of(transaction), []).append(transaction)
    assert sorted(by_envid) == sorted(s.envid for s in MESSAGES)
    assert [t.sender for t in literal.received] == ["<>"]  # aiosmtpd keeps the brackets
    assert literal.received[0].recipients == [f"user@[{LITERAL}]"]
    for sent in MESSAGES:
        reported: dict[str, str] = {}
        for transaction in by_envid[sent.envid]:
            assert transaction.sender == "<>"
            assert transaction.recipients == [sent.sender]
            actions = reported_actions(status_blocks(status_of(transaction.content)))
            (action,) = set(actions.values())  # one DSN per kind
            checked = check_dsn(
                transaction.content,
                transaction.mail_options,
                Expected(
                    sent.sender,
                    actions,
                    smtputf8_original=sent.smtputf8,
                    full=sent.full and action == "failed",
                ),
            )
            reported.update(actions)
            text = " ".join(checked.notification.split())
            if sent.envid.startswith("long"):
                assert "are cut short in the attached copy" in text
            if sent.content is LONG_HEADERS:
                assert "only their first 64 KiB are attached" in text
        assert reported == sent.recipients, sent.envid
