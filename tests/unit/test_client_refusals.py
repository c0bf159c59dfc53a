"""What the SMTP client refuses to send before talking: a message that needs SMTPUTF8 to a
primary without it (5.6.7), a message over the primary's advertised SIZE (5.3.4); and the
body as DATA puts it on the wire (the end-to-end check is test_forwarding_corpus.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from backupmx.deliver.client import PrimaryConnection, Target, Timeouts
from backupmx.mail.reply import Verdict
from backupmx.mail.wire import on_the_wire
from backupmx.queue.records import Outbound


def connection(features: dict[str, str]) -> PrimaryConnection:
    smtp: Any = None  # never used: the refusal is decided before any command
    return PrimaryConnection(
        Target("mx1.example.test", "127.0.0.2", 25), smtp, Timeouts(1, 1, 1, 1), features=features
    )


def message(size: int = 100, smtputf8: bool = False) -> Outbound:
    return Outbound(
        "Q1", "a@sender.test", b"x" * size, size, "7BIT", smtputf8, None, None, datetime.now(UTC)
    )


def test_smtputf8_message_to_a_primary_without_smtputf8_bounces_5_6_7() -> None:
    refusal = connection({"size": "0"})._refusal(message(smtputf8=True))
    assert refusal is not None and refusal.verdict is Verdict.BOUNCED and refusal.status == "5.6.7"
    assert connection({"smtputf8": ""})._refusal(message(smtputf8=True)) is None


def test_message_over_the_primarys_size_bounces_5_3_4() -> None:
    refusal = connection({"size": "1000"})._refusal(message(size=2000))
    assert refusal is not None and refusal.verdict is Verdict.BOUNCED and refusal.status == "5.3.4"
    assert connection({"size": "0"})._refusal(message(size=2000)) is None
    assert connection({})._refusal(message(size=2000)) is None


def test_body_on_the_wire_is_dot_stuffed_and_ends_with_the_dot_line() -> None:
    assert on_the_wire(b"a\r\n.\r\n..b\r\n.") == b"a\r\n..\r\n...b\r\n..\r\n.\r\n"
    assert on_the_wire(b".first\r\n") == b"..first\r\n.\r\n"
    assert on_the_wire(b"") == b"\r\n.\r\n"


def test_a_bare_line_end_never_reaches_the_wire() -> None:
    # Stored bodies have none (receive invariant); if one did, "\n.\n" must not end DATA.
    assert on_the_wire(b"a\n.\nb\r.\rc") == b"a\r\n..\r\nb\r\n..\r\nc\r\n.\r\n"
