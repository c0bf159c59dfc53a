"""One message's SMTP transaction with a primary (deliver/client.py), driven by a scripted
primary instead of a socket: which replies make a recipient delivered.

RFC 5321 §4.2.1: the first digit says it all; a 2xx to MAIL or RCPT is an
acceptance whatever the rest of the code (Postfix checks ``code / 100 == 2``),
and only the reply to the body, after ``354``, delivers.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from aiosmtplib import SMTPResponse

from backupmx.deliver.client import PrimaryConnection, Target, Timeouts
from backupmx.mail.reply import Verdict
from backupmx.queue.records import Claim, Outbound

MESSAGE = Outbound(
    "Q1", "a@sender.test", b"Subject: x\r\n\r\nbody\r\n", 22, "7BIT", False, None, None,
    datetime(2026, 1, 5, tzinfo=UTC),
)  # fmt: skip


class ScriptedPrimary:
    """The part of aiosmtplib.SMTP a connection uses, answering from a script: one
    (code, text) per command in order, the reply to the body included."""

    def __init__(self, replies: Iterable[tuple[int, str]]) -> None:
        self.replies = list(replies)
        self.commands: list[bytes] = []
        self.body: bytes | None = None
        self.protocol = self

    async def execute_command(self, *args: bytes, **options: object) -> SMTPResponse:
        self.commands.append(args[0])
        return self._next()

    def write(self, data: bytes) -> None:
        self.body = data

    async def read_response(self, **options: object) -> SMTPResponse:
        return self._next()

    def _next(self) -> SMTPResponse:
        code, text = self.replies.pop(0)
        return SMTPResponse(code, text)


def claims(count: int) -> list[Claim]:
    return [
        Claim(i, "Q1", f"r{i}@example.test", "example.test", 1, None, None) for i in range(count)
    ]


async def send(
    replies: Iterable[tuple[int, str]], recipients: int
) -> tuple[list[Verdict], ScriptedPrimary]:
    primary = ScriptedPrimary(replies)
    connection = PrimaryConnection(
        Target("mx1.example.test", "127.0.0.2", 25),
        primary,
        Timeouts(1, 1, 1, 1),  # type: ignore[arg-type]
    )
    report = await connection.send(MESSAGE, claims(recipients), hold_5xx=False)
    return [o.verdict for o in report.outcomes], primary


async def test_recipients_accepted_with_250_and_251_are_delivered_by_the_body() -> None:
    verdicts, primary = await send(
        [(250, "ok"), (250, "ok"), (251, "forwarded"), (354, "go"), (250, "queued")], 2
    )
    assert verdicts == [Verdict.DELIVERED, Verdict.DELIVERED]
    assert primary.body is not None


async def test_a_recipient_refused_while_another_is_accepted_keeps_its_own_verdict() -> None:
    verdicts, _ = await send(
        [(250, "ok"), (550, "5.1.1 unknown"), (250, "ok"), (354, "go"), (250, "ok")], 2
    )
    assert verdicts == [Verdict.BOUNCED, Verdict.DELIVERED]


async def test_any_2xx_to_rcpt_accepts_the_recipient_and_the_body_is_sent_to_it() -> None:
    verdicts, primary = await send(
        [(250, "ok"), (250, "ok"), (252, "cannot verify, will accept"), (354, "go"), (250, "ok")], 2
    )
    assert verdicts == [Verdict.DELIVERED, Verdict.DELIVERED]
    assert primary.commands == [b"MAIL", b"RCPT", b"RCPT", b"DATA"]


async def test_a_recipient_is_never_delivered_without_a_body_sent() -> None:
    verdicts, primary = await send([(250, "ok"), (252, "will accept"), (354, "go"), (250, "ok")], 1)
    assert verdicts == [Verdict.DELIVERED]
    assert primary.body is not None


async def test_any_2xx_to_mail_opens_the_transaction() -> None:
    verdicts, primary = await send([(251, "sender ok"), (250, "ok"), (354, "go"), (250, "ok")], 1)
    assert verdicts == [Verdict.DELIVERED]
    assert primary.body is not None


async def test_a_2xx_where_354_belongs_is_a_protocol_error_and_defers() -> None:
    verdicts, primary = await send([(250, "ok"), (250, "ok"), (250, "ok?"), (250, "reset")], 1)
    assert verdicts == [Verdict.DEFERRED]
    assert primary.body is None


async def test_a_fence_fallen_while_data_waits_for_its_354_sends_no_body() -> None:
    """One command at a time too: the fence is asked after DATA's 354, and when it has
    fallen the connection is closed before any byte of the body."""

    class Closable(ScriptedPrimary):
        closed = False

        def close(self) -> None:
            self.closed = True

    primary = Closable([(250, "ok"), (250, "ok"), (354, "go"), (250, "queued")])
    connection = PrimaryConnection(
        Target("mx1.example.test", "127.0.0.2", 25),
        primary,  # type: ignore[arg-type]
        Timeouts(1, 1, 1, 1),
    )
    report = await connection.send(MESSAGE, claims(1), hold_5xx=False, may_send=lambda: False)
    assert primary.commands == [b"MAIL", b"RCPT", b"DATA"]
    assert primary.body is None and primary.closed
    assert report.abandoned and not report.usable
    assert [o.verdict for o in report.outcomes] == [Verdict.DEFERRED]
