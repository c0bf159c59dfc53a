"""How one message's delivery attempt is logged (`attempt.log_events`): per message, with
a line per recipient only where its outcome differs."""

from __future__ import annotations

from backupmx.deliver.attempt import log_events
from backupmx.mail.reply import classify, deferred
from backupmx.queue.records import Claim


def claims(count: int) -> list[Claim]:
    return [
        Claim(n, "Q1", f"user{n}@example.test", "example.test", 1, None, None) for n in range(count)
    ]


def test_a_deferral_of_1000_recipients_is_one_line_with_their_count() -> None:
    busy = classify(451, "4.3.0 try again later")
    assert log_events(claims(1000), [busy] * 1000) == [
        ("message_deferred", {"recipients": 1000, "reply": "451 4.3.0 try again later"})
    ]


def test_the_one_refused_among_the_accepted_is_named() -> None:
    taken, refused = classify(250, "2.0.0 Ok"), classify(550, "5.1.1 no such user")
    outcomes = [taken, refused, taken]
    assert log_events(claims(3), outcomes) == [
        ("message_delivered", {"recipients": 2, "reply": "250 2.0.0 Ok"}),
        (
            "recipient_bounced",
            {"recipient": "user1@example.test", "reply": "550 5.1.1 no such user"},
        ),
    ]


def test_a_single_recipient_is_named_on_the_message_line() -> None:
    events = log_events(claims(1), [deferred("connection refused")])
    assert events == [
        (
            "message_deferred",
            {"recipients": 1, "reply": "connection refused", "recipient": "user0@example.test"},
        )
    ]


def test_the_same_verdict_with_another_reply_differs() -> None:
    full = classify(452, "4.2.2 mailbox full")
    busy = classify(451, "4.3.0 try again later")
    events = log_events(claims(3), [busy, full, busy])
    assert [(name, fields.get("recipients")) for name, fields in events] == [
        ("message_deferred", 2),
        ("recipient_deferred", None),
    ]


def test_every_recipient_is_counted_once() -> None:
    outcomes = [classify(250, "ok")] * 5 + [classify(550, f"5.1.1 no {n}") for n in range(3)]
    events = log_events(claims(8), outcomes)
    counted = sum(int(fields.get("recipients", 1)) for _, fields in events)
    assert counted == 8 and len(events) == 4
