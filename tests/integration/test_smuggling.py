"""SMTP smuggling: only ``<CRLF>.<CRLF>`` ends DATA, and no bare CR or LF is ever stored.

The variants are the ones public smuggling checkers send (CVE-2023-51764,
CVE-2023-51765, CVE-2023-51766): a near-miss end-of-data sequence inside the
body, followed by a second, smuggled transaction, then the real end and QUIT,
all after the server's 354.  A server that ends DATA early answers the smuggled
MAIL, RCPT and DATA itself and queues a second message; a server that stores
the bare CR or LF hands the smuggle on to the primary, which may split it there.

Each variant runs in its own session over a raw socket against a real
`backupmx serve`: once with the default ``bare_newline = "normalize"`` (one
message, normalized, the smuggled text kept as body content) and once with
``"reject"`` (``550 5.6.0`` and nothing stored).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.server import ServerProcess
from tests.support.smtp_client import (
    RawClient,
    Reply,
    bare_newlines,
    queue_id,
    serving,
    split_received,
    stored_in_parallel,
)

HEAD = b"From: <smuggler@sender.test>\r\nSubject: smuggling test\r\n\r\nfirst line"
SMUGGLED_COMMANDS = b"MAIL FROM:<evil@x>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
SMUGGLED = SMUGGLED_COMMANDS + b"From: <evil@x>\r\nSubject: smuggled\r\n\r\nsmuggled body"
END = b"\r\n.\r\n"


@dataclass(frozen=True)
class Variant:
    name: str
    marker: bytes  # the near-miss end of data
    first_line: bool = False  # the marker opens the body instead of following a line

    @property
    def bare(self) -> bool:
        return bool(bare_newlines(self.marker))

    def content(self) -> bytes:
        """Everything sent after the 354: body, real end of data, QUIT."""
        before = b"" if self.first_line else HEAD
        return before + self.marker + SMUGGLED + END + b"QUIT\r\n"


VARIANTS = [
    Variant("lf-dot-lf", b"\n.\n"),
    Variant("lf-dot-crlf", b"\n.\r\n"),
    Variant("cr-dot-crlf", b"\r.\r\n"),
    Variant("crlf-dot-cr", b"\r\n.\r"),
    Variant("crlf-dot-lf", b"\r\n.\n"),
    Variant("cr-dot-lf", b"\r.\n"),
    Variant("cr-dot-cr", b"\r.\r"),
    Variant("lf-dot-cr", b"\n.\r"),
    Variant("crlf-dot-cr-crlf", b"\r\n.\r\r\n"),
    Variant("lf-lf-dot-lf-lf", b"\n\n.\n\n"),
    Variant("crlf-nul-dot-crlf", b"\r\n\x00.\r\n"),
    Variant("crlf-dot-nul-crlf", b"\r\n.\x00\r\n"),
    Variant("dot-lf-as-first-line", b".\n", first_line=True),
    Variant("dot-cr-as-first-line", b".\r", first_line=True),
]
BARE_VARIANTS = [v for v in VARIANTS if v.bare]


def sender_of(variant: Variant) -> str:
    return f"smuggler+{variant.name}@sender.test"


def smuggle(server: ServerProcess, variant: Variant) -> list[Reply]:
    """Send one smuggling session; return every reply after the 354."""
    with RawClient(server.host, server.port) as client:
        client.send(
            b"EHLO smuggler.test\r\n"
            + f"MAIL FROM:<{sender_of(variant)}>\r\n".encode()
            + b"RCPT TO:<alice@example.test>\r\n"
            + b"DATA\r\n"
        )
        envelope = client.replies(4)
        assert [r.code for r in envelope] == [250, 250, 250, 354], envelope
        client.send(variant.content())
        return client.replies_until_closed()


@dataclass
class Battery:
    replies: dict[str, list[Reply]]
    stored: list[dict[str, Any]]
    raw: dict[str, bytes]  # by variant name, for each message a reply named


def run_battery(server: ServerProcess, variants: list[Variant]) -> Battery:
    replies = {v.name: smuggle(server, v) for v in variants}
    stored = server.queue()
    queued = {
        name: queue_id(found[0])
        for name, found in replies.items()
        if found and "queued as" in str(found[0])
    }
    raw = stored_in_parallel(server, list(queued.values()))
    return Battery(replies, stored, {name: raw[queued[name]] for name in queued})


@pytest.fixture(scope="module")
def normalizing_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(ServerProcess(tmp_path_factory.mktemp("normalize"))) as server:
        yield server


@pytest.fixture(scope="module")
def rejecting_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("reject")
    with serving(ServerProcess(directory, limits={"bare_newline": "reject"})) as server:
        yield server


@pytest.fixture(scope="module")
def normalized(normalizing_server: ServerProcess) -> Battery:
    return run_battery(normalizing_server, VARIANTS)


@pytest.fixture(scope="module")
def rejected(rejecting_server: ServerProcess) -> Battery:
    return run_battery(rejecting_server, BARE_VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_near_miss_end_of_data_does_not_end_the_message(
    normalized: Battery, variant: Variant
) -> None:
    replies = normalized.replies[variant.name]
    assert [str(r)[:9] for r in replies] == ["250 2.0.0", "221 2.0.0"], replies
    mine = [m for m in normalized.stored if m["sender"] == sender_of(variant)]
    assert [m["id"] for m in mine] == [queue_id(replies[0])]
    assert [r["address"] for r in mine[0]["recipients"]] == ["alice@example.test"]


def test_smuggled_transaction_is_never_queued(normalized: Battery, rejected: Battery) -> None:
    senders = [m["sender"] for m in normalized.stored + rejected.stored]
    assert "evil@x" not in senders
    assert all(
        r["address"] != "bob@example.test" for m in normalized.stored for r in m["recipients"]
    )


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_stored_body_has_no_bare_cr_or_lf(normalized: Battery, variant: Variant) -> None:
    stored = normalized.raw[variant.name]
    assert bare_newlines(stored) == [], stored
    assert stored.endswith(b"\r\n")


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_smuggled_text_is_stored_as_body_content(normalized: Battery, variant: Variant) -> None:
    _, body = split_received(normalized.raw[variant.name])
    if not variant.first_line:
        assert body.startswith(HEAD), body
    assert SMUGGLED_COMMANDS in body, body
    assert body.endswith(b"\r\n\r\nsmuggled body\r\n"), body


@pytest.mark.parametrize("variant", BARE_VARIANTS, ids=lambda v: v.name)
def test_reject_mode_refuses_bare_cr_or_lf_with_550_5_6_0(
    rejected: Battery, variant: Variant
) -> None:
    replies = rejected.replies[variant.name]
    assert [str(r)[:9] for r in replies] == ["550 5.6.0", "221 2.0.0"], replies


def test_reject_mode_stores_nothing(rejected: Battery) -> None:
    battery_senders = {sender_of(v) for v in BARE_VARIANTS} | {"evil@x"}
    assert [m["id"] for m in rejected.stored if m["sender"] in battery_senders] == []


def test_reject_mode_session_goes_on_after_550(rejecting_server: ServerProcess) -> None:
    variant = Variant("lf-dot-lf", b"\n.\n")
    with RawClient(rejecting_server.host, rejecting_server.port) as client:
        client.send(b"EHLO smuggler.test\r\nMAIL FROM:<again@sender.test>\r\n")
        client.send(b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
        assert [r.code for r in client.replies(4)] == [250, 250, 250, 354]
        client.send(HEAD + variant.marker + SMUGGLED + END)
        assert client.reply().startswith("550 5.6.0")
        client.send(b"MAIL FROM:<again@sender.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        assert [r.code for r in client.replies(3)] == [250, 250, 354]
        client.send(b"Subject: clean\r\n\r\nclean body\r\n.\r\n")
        assert client.reply().startswith("250 2.0.0")


# ------------------------------------------------------------------ dot-stuffing


def send_content(server: ServerProcess, content: bytes, sender: str) -> Reply:
    """One message whose DATA content (end of data included) is sent exactly as given."""
    with RawClient(server.host, server.port) as client:
        client.send(f"EHLO dots.test\r\nMAIL FROM:<{sender}>\r\n".encode())
        client.send(b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
        assert [r.code for r in client.replies(4)] == [250, 250, 250, 354]
        client.send(content)
        reply = client.reply()
        client.command("QUIT")
    return reply


def test_dot_stuffing_is_undone_and_empty_message_is_stored(
    normalizing_server: ServerProcess,
) -> None:
    stuffed = send_content(
        normalizing_server,
        b"Subject: dots\r\n\r\n..\r\n..foo\r\n...\r\nmid.dle.\r\n .\r\n.\r\n",
        "dots@sender.test",
    )
    empty = send_content(normalizing_server, b".\r\n", "empty@sender.test")
    assert stuffed.startswith("250 2.0.0") and empty.startswith("250 2.0.0")
    raw = stored_in_parallel(normalizing_server, [queue_id(stuffed), queue_id(empty)])
    _, body = split_received(raw[queue_id(stuffed)])
    assert body == b"Subject: dots\r\n\r\n.\r\n.foo\r\n..\r\nmid.dle.\r\n .\r\n"
    header, body = split_received(raw[queue_id(empty)])
    assert body == b""
    assert header.startswith(b"Received: from dots.test ([127.0.0.1])")


def test_dot_without_crlf_before_it_does_not_end_data(normalizing_server: ServerProcess) -> None:
    with RawClient(normalizing_server.host, normalizing_server.port) as client:
        client.send(b"EHLO dots.test\r\nMAIL FROM:<trailing@sender.test>\r\n")
        client.send(b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
        assert [r.code for r in client.replies(4)] == [250, 250, 250, 354]
        client.send(b"Subject: no end yet\r\n\r\nends with a dot.\r\n")
        assert client.silent_for(0.3), "a line ending in '.' ended DATA"
        client.send(b"x.\r")
        assert client.silent_for(0.3), "'.<CR>' ended DATA"
        client.send(b"\n.\r\n")
        reply = client.reply()
    assert reply.startswith("250 2.0.0"), reply
    _, body = split_received(normalizing_server.raw(queue_id(reply)))
    assert body == b"Subject: no end yet\r\n\r\nends with a dot.\r\nx.\r\n"


def test_end_of_data_split_across_tcp_segments_is_found(normalizing_server: ServerProcess) -> None:
    content = HEAD + b"\n.\n" + SMUGGLED + END
    with RawClient(normalizing_server.host, normalizing_server.port) as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.send(b"EHLO split.test\r\nMAIL FROM:<split@sender.test>\r\n")
        client.send(b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
        assert [r.code for r in client.replies(4)] == [250, 250, 250, 354]
        client.send(content[:-24])
        for byte in content[-24:]:
            client.send(bytes([byte]))
            time.sleep(0.01)
        client.send(b"QUIT\r\n")
        replies = client.replies_until_closed()
    assert [str(r)[:9] for r in replies] == ["250 2.0.0", "221 2.0.0"], replies
    stored = normalizing_server.raw(queue_id(replies[0]))
    assert bare_newlines(stored) == []
    assert stored.endswith(b"\r\n\r\nsmuggled body\r\n")
