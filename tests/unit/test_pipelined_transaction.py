"""One message's pipelined SMTP transaction (RFC 2920, deliver/client.py) with a primary
that offers PIPELINING, driven by a scripted transport instead of a socket.

MAIL, every RCPT and DATA go out in one write and their replies are read in order;
the body follows only a 354 with a recipient accepted.  The verdicts are those of the
transaction one command at a time (test_primary_transaction.py): only the reply to
the body delivers, a refused recipient keeps its own verdict, and a DATA answered
354 with nothing to send is ended empty, delivering nobody.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime

from aiosmtplib import SMTPResponse

from backupmx.deliver.client import PipelinedReplies, PrimaryConnection, Target, Timeouts
from backupmx.mail.reply import Verdict
from backupmx.queue.records import Claim, Outbound

MESSAGE = Outbound(
    "Q1", "a@sender.test", b"Subject: x\r\n\r\nbody\r\n", 22, "7BIT", False, None, None,
    datetime(2026, 1, 5, tzinfo=UTC),
)  # fmt: skip
BODY_ON_THE_WIRE = b"Subject: x\r\n\r\nbody\r\n.\r\n"


class ScriptedTransport:
    """The transport a connection lends to its pipelined reader: each write is
    answered, one reply per command line (and one for a body), from the script, in
    chunks cut mid-line; a reply of code 0 closes the connection instead."""

    def __init__(self, replies: Iterable[str]) -> None:
        self.replies = list(replies)
        self.writes: list[bytes] = []
        self.protocol: asyncio.BaseProtocol | None = None
        self.closed = False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self._lost)

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        lines = data.count(b"\r\n") if data.startswith((b"MAIL", b"RSET")) else 1
        answer = "".join(self.replies.pop(0) for _ in range(lines) if self.replies)
        if answer.startswith("000"):
            self.close()
            return
        wire = answer.encode()
        for start in range(0, len(wire), 7):
            asyncio.get_running_loop().call_soon(self._feed, wire[start : start + 7])

    def _feed(self, chunk: bytes) -> None:
        assert isinstance(self.protocol, asyncio.Protocol)
        self.protocol.data_received(chunk)

    def _lost(self) -> None:
        assert self.protocol is not None
        self.protocol.connection_lost(None)


class Owner(asyncio.Protocol):
    """aiosmtplib's protocol as the reader sees it: told when the connection goes."""

    def __init__(self, transport: ScriptedTransport) -> None:
        self.transport = transport
        self.lost = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class ScriptedSMTP:
    """The part of aiosmtplib.SMTP a pipelining connection uses besides the transport."""

    def __init__(self, transport: ScriptedTransport) -> None:
        self.protocol = Owner(transport)
        self.transport = transport
        self.commands: list[bytes] = []

    async def execute_command(self, *args: bytes, **options: object) -> SMTPResponse:
        self.commands.append(args[0])  # RSET: the reply is not in the script
        return SMTPResponse(250, "reset")

    def close(self) -> None:
        self.transport.close()


def claims(count: int) -> list[Claim]:
    return [
        Claim(i, "Q1", f"r{i}@example.test", "example.test", 1, None, None) for i in range(count)
    ]


def pipelining(smtp: ScriptedSMTP) -> PrimaryConnection:
    """A connection to a primary that offers PIPELINING, over the scripted transport."""
    return PrimaryConnection(
        Target("mx1.example.test", "127.0.0.2", 25),
        smtp,  # type: ignore[arg-type]
        Timeouts(1, 1, 1, 1),
        features={"pipelining": ""},
    )


async def send(
    replies: Iterable[str], recipients: int
) -> tuple[list[Verdict], ScriptedTransport, ScriptedSMTP, bool]:
    transport = ScriptedTransport(replies)
    smtp = ScriptedSMTP(transport)
    connection = pipelining(smtp)
    report = await connection.send(MESSAGE, claims(recipients), hold_5xx=False)
    return [o.verdict for o in report.outcomes], transport, smtp, report.usable


async def test_mail_every_rcpt_and_data_go_out_in_one_write_and_the_body_in_another() -> None:
    verdicts, transport, smtp, usable = await send(
        ["250 ok\r\n", "250 ok\r\n", "251 forwarded\r\n", "354 go\r\n", "250 queued\r\n"], 2
    )
    assert verdicts == [Verdict.DELIVERED, Verdict.DELIVERED]
    assert transport.writes == [
        b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<r0@example.test>\r\n"
        b"RCPT TO:<r1@example.test>\r\nDATA\r\n",
        BODY_ON_THE_WIRE,
    ]
    assert smtp.commands == []
    assert usable
    assert transport.protocol is smtp.protocol  # the transport is given back


async def test_a_refused_recipient_keeps_its_verdict_beside_an_accepted_one() -> None:
    verdicts, _, _, _ = await send(
        ["250 ok\r\n", "550 5.1.1 unknown\r\n", "250 ok\r\n", "354 go\r\n", "250 ok\r\n"], 2
    )
    assert verdicts == [Verdict.BOUNCED, Verdict.DELIVERED]


async def test_multi_line_replies_cut_anywhere_are_read_whole() -> None:
    verdicts, _, _, _ = await send(
        ["250-first\r\n250 ok\r\n", "250 ok\r\n", "354 go\r\n", "250-queued\r\n250 as Q\r\n"], 1
    )
    assert verdicts == [Verdict.DELIVERED]


async def test_no_recipient_accepted_and_data_refused_sends_no_body() -> None:
    verdicts, transport, smtp, usable = await send(
        ["250 ok\r\n", "550 unknown\r\n", "554 no valid recipients\r\n"], 1
    )
    assert verdicts == [Verdict.BOUNCED]
    assert len(transport.writes) == 1
    assert smtp.commands == [b"RSET"]
    assert usable


async def test_a_354_with_no_recipient_accepted_is_ended_empty_and_delivers_nobody() -> None:
    verdicts, transport, _, _ = await send(
        ["250 ok\r\n", "450 try later\r\n", "354 go\r\n", "554 no recipients\r\n"], 1
    )
    assert verdicts == [Verdict.DEFERRED]
    assert transport.writes[1] == b".\r\n"


async def test_a_refused_sender_refuses_every_recipient_and_no_body_goes() -> None:
    verdicts, transport, smtp, _ = await send(
        ["451 4.3.0 later\r\n", "503 need MAIL\r\n", "503 need MAIL\r\n", "503 need MAIL\r\n"], 2
    )
    assert verdicts == [Verdict.DEFERRED, Verdict.DEFERRED]
    assert len(transport.writes) == 1
    assert smtp.commands == [b"RSET"]


async def test_data_refused_defers_the_accepted_recipients_as_a_sign_of_congestion() -> None:
    transport = ScriptedTransport(["250 ok\r\n", "250 ok\r\n", "452 4.3.1 full\r\n"])
    smtp = ScriptedSMTP(transport)
    connection = pipelining(smtp)
    report = await connection.send(MESSAGE, claims(1), hold_5xx=False)
    assert [o.verdict for o in report.outcomes] == [Verdict.DEFERRED]
    assert report.congestion
    assert len(transport.writes) == 1


async def test_a_421_defers_every_recipient_not_refused_and_the_connection_goes() -> None:
    verdicts, transport, _, usable = await send(
        ["250 ok\r\n", "550 unknown\r\n", "250 ok\r\n", "421 4.7.0 too busy\r\n"], 4
    )
    assert verdicts == [Verdict.BOUNCED, Verdict.DEFERRED, Verdict.DEFERRED, Verdict.DEFERRED]
    assert not usable
    assert transport.closed


async def test_a_connection_lost_before_the_reply_to_the_body_defers_everyone() -> None:
    verdicts, _, smtp, usable = await send(["250 ok\r\n", "250 ok\r\n", "354 go\r\n", "000"], 1)
    assert verdicts == [Verdict.DEFERRED]
    assert not usable
    await asyncio.sleep(0)  # the loss reaches aiosmtplib's protocol too
    assert smtp.protocol.lost


async def test_a_reply_that_is_no_reply_fails_the_connection() -> None:
    replies = PipelinedReplies(asyncio.Protocol())
    replies.data_received(b"250 ok\r\nhello\r\n")
    assert (await replies.next(1)).code == 250
    try:
        await replies.next(1)
    except Exception as error:
        assert "Malformed" in str(error)
    else:
        raise AssertionError("a malformed line was taken for a reply")


async def test_a_fence_fallen_while_data_waits_for_its_354_sends_no_body() -> None:
    """A node stopped between the commands and the 354 may find, when it continues,
    that another node has taken its recipients over: the body must not go, and the
    connection closes inside DATA, before the end of data, so nothing is delivered."""
    transport = ScriptedTransport(["250 ok\r\n", "250 ok\r\n", "354 go\r\n", "250 queued\r\n"])
    smtp = ScriptedSMTP(transport)
    connection = pipelining(smtp)
    asked: list[int] = []

    def fence() -> bool:  # falls once the commands are on their way
        asked.append(len(transport.writes))
        return False

    report = await connection.send(MESSAGE, claims(1), hold_5xx=False, may_send=fence)
    assert asked == [1]  # asked once, after the commands, before the body
    assert report.abandoned and not report.usable
    assert [o.verdict for o in report.outcomes] == [Verdict.DEFERRED]
    assert len(transport.writes) == 1  # MAIL, RCPT and DATA; no byte of the body
    assert transport.closed
