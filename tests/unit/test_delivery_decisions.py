"""The per-message delivery decisions (deliver/attempt.py) as plain data: what the
deliverer does with each recipient given the route, the replies and the connection."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from backupmx.deliver.attempt import (
    SendReport,
    accepted,
    after_data,
    broken_off,
    congestion,
    dead_destination,
    keeps_connection,
    pacer_feedback,
    refusal,
    result,
    retry_time,
    unreachable,
    without_route,
)
from backupmx.deliver.route import Bounce, Defer
from backupmx.mail.reply import Outcome, Verdict, bounced, classify, deferred
from backupmx.queue.records import Claim, Outbound, Result
from backupmx.queue.state import Event

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
HOST = "mx1.example.test[127.0.0.2]:25"


def claim(recipient_id: int = 1, attempts: int = 1) -> Claim:
    return Claim(
        recipient_id, "Q1", f"r{recipient_id}@example.test", "example.test", attempts, None, None
    )


def message(size: int = 100, smtputf8: bool = False) -> Outbound:
    return Outbound("Q1", "a@sender.test", b"x" * size, size, "7BIT", smtputf8, None, None, NOW)


class NoJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return 1.0


# --------------------------------------------------------------------------- before sending


def test_a_null_mx_or_nxdomain_bounces_every_recipient_with_its_status() -> None:
    outcome = without_route(Bounce(556, "5.1.10", "example.test does not accept mail"))
    assert outcome == bounced("example.test does not accept mail", "5.1.10")


def test_any_other_missing_route_defers_and_never_bounces() -> None:
    outcome = without_route(Defer("no MX better than this host"))
    assert outcome.verdict is Verdict.DEFERRED
    assert outcome.text == "no MX better than this host"


def test_a_primary_that_failed_while_the_message_waited_is_not_knocked_on_again() -> None:
    assert dead_destination((105.0, "connection refused"), claimed_at=100.0) == deferred(
        "connection refused"
    )
    assert dead_destination((100.0, "timeout"), claimed_at=100.0) == deferred("timeout")


def test_a_failure_seen_before_the_claim_does_not_stop_the_message() -> None:
    # The store hands out no recipient of a domain marked down: something reset it.
    assert dead_destination((99.0, "connection refused"), claimed_at=100.0) is None


def test_a_primary_not_known_down_is_tried() -> None:
    assert dead_destination(None, claimed_at=100.0) is None


def test_an_smtputf8_message_to_a_primary_without_smtputf8_bounces_5_6_7() -> None:
    outcome = refusal(message(smtputf8=True), HOST, smtputf8=False, size_limit=0)
    assert outcome is not None and (outcome.verdict, outcome.status) == (Verdict.BOUNCED, "5.6.7")
    assert HOST in outcome.text
    assert refusal(message(smtputf8=True), HOST, smtputf8=True, size_limit=0) is None


def test_a_message_over_the_advertised_size_bounces_5_3_4_and_one_at_it_goes() -> None:
    outcome = refusal(message(size=2000), HOST, smtputf8=False, size_limit=1999)
    assert outcome is not None and (outcome.verdict, outcome.status) == (Verdict.BOUNCED, "5.3.4")
    assert refusal(message(size=2000), HOST, smtputf8=False, size_limit=2000) is None


def test_no_advertised_size_means_no_limit() -> None:
    assert refusal(message(size=10**9), HOST, smtputf8=False, size_limit=0) is None


# --------------------------------------------------------------------------- while sending


@pytest.mark.parametrize(
    ("code", "slow_down"),
    [(421, True), (450, True), (452, True), (250, False), (550, False), (554, False)],
)
def test_421_and_every_4xx_to_mail_or_data_mean_congestion(code: int, slow_down: bool) -> None:
    assert congestion(code) is slow_down


def test_a_connection_broken_before_any_answer_defers_every_recipient() -> None:
    assert broken_off([], 3, "lost connection") == [deferred("lost connection")] * 3


def test_answers_received_before_the_break_are_kept() -> None:
    refused = classify(550, "5.1.1 unknown")
    assert broken_off([refused, refused], 2, "lost") == [refused, refused]


def test_a_break_never_leaves_a_recipient_delivered() -> None:
    delivered = classify(250, "ok")
    outcomes = broken_off([delivered, delivered], 2, "lost")
    assert [o.verdict for o in outcomes] == [Verdict.DEFERRED, Verdict.DEFERRED]


def test_a_break_keeps_every_answer_in_its_recipients_place() -> None:
    refused = classify(550, "5.1.1 unknown")
    outcomes = broken_off([classify(250, "ok"), refused], 3, "lost")
    assert outcomes == [deferred("lost"), refused, deferred("lost")]


@pytest.mark.parametrize(
    ("code", "takes"),
    [(250, True), (251, True), (252, True), (354, False), (421, False), (450, False), (550, False)],
)
def test_any_2xx_to_mail_or_rcpt_takes_it(code: int, takes: bool) -> None:
    assert accepted(code) is takes


def test_the_reply_to_the_body_decides_the_accepted_recipients() -> None:
    assert after_data(250, "2.0.0 queued", False, body_sent=True).verdict is Verdict.DELIVERED
    assert after_data(552, "5.3.4 too big", False, body_sent=True).verdict is Verdict.BOUNCED
    assert after_data(554, "5.7.1 no", True, body_sent=True).verdict is Verdict.HELD
    assert after_data(451, "4.3.0 later", False, body_sent=True).verdict is Verdict.DEFERRED


def test_a_refused_data_command_fails_as_its_reply_says() -> None:
    assert (
        after_data(554, "5.5.1 no valid recipients", False, body_sent=False).verdict
        is Verdict.BOUNCED
    )
    assert after_data(451, "4.3.0 later", False, body_sent=False).verdict is Verdict.DEFERRED


def test_a_2xx_instead_of_354_delivers_nothing() -> None:
    outcome = after_data(250, "ok", False, body_sent=False)
    assert (outcome.verdict, outcome.code, outcome.status) == (Verdict.DEFERRED, 250, "4.5.0")


# --------------------------------------------------------------------------- after sending


def test_no_reachable_host_gives_each_hosts_reason() -> None:
    assert unreachable(["mx1: refused", "mx2: timed out"]) == "mx1: refused; mx2: timed out"


def test_a_route_with_no_host_tried_says_so() -> None:
    assert unreachable([]) == "no host to try"


def test_congestion_slows_the_host_down_whatever_else_happened() -> None:
    report = SendReport([classify(250, "ok")], congestion=True)
    assert pacer_feedback(report) == "congestion"


def test_one_delivered_recipient_widens_the_hosts_window() -> None:
    report = SendReport([classify(550, "no"), classify(250, "ok")])
    assert pacer_feedback(report) == "success"


def test_refusals_without_congestion_leave_the_window_alone() -> None:
    assert pacer_feedback(SendReport([classify(550, "no"), classify(451, "later")])) is None


def test_a_usable_connection_is_kept_until_it_carried_messages_per_connection() -> None:
    assert keeps_connection(SendReport([]), sent=99, messages_per_connection=100)
    assert not keeps_connection(SendReport([]), sent=100, messages_per_connection=100)


def test_a_broken_connection_is_never_kept() -> None:
    assert not keeps_connection(SendReport([], usable=False), sent=1, messages_per_connection=100)


def test_a_message_is_retried_at_one_time_paced_by_its_most_tried_recipient() -> None:
    claims = [claim(1, attempts=1), claim(2, attempts=3), claim(3, attempts=2)]
    at = retry_time(NOW, claims, 300.0, 4000.0, NoJitter())
    assert at == NOW + timedelta(seconds=1200)


def test_a_delivered_recipient_is_recorded_without_an_error_or_retry_time() -> None:
    """Every row names its claim (``attempts``), so a late one is not applied; the host
    and its reply go to the attempt history, a delivery's too."""
    row = result(claim(7), classify(250, "2.0.0 ok"), NOW, HOST)
    assert row == Result(7, Event.SUCCESS, claim_attempts=1, host=HOST, reply="250 2.0.0 ok")


def test_a_deferred_recipient_keeps_the_reply_and_the_retry_time() -> None:
    row = result(claim(7), classify(451, "4.3.0 try later"), NOW, HOST)
    reply = "451 4.3.0 try later"
    assert row == Result(7, Event.TEMPFAIL, reply, NOW, 1, HOST, reply)


def test_a_bounced_recipient_keeps_the_reply_and_is_not_retried() -> None:
    row = result(claim(7), classify(550, "5.1.1 unknown"), NOW, HOST)
    reply = "550 5.1.1 unknown"
    assert row == Result(7, Event.PERMFAIL, reply, None, 1, HOST, reply)


def test_a_held_recipient_keeps_the_reply_and_waits_for_release() -> None:
    row = result(claim(7), classify(550, "5.1.1 unknown", hold_5xx=True), NOW, HOST)
    reply = "550 5.1.1 unknown"
    assert row == Result(7, Event.QUARANTINE, reply, None, 1, HOST, reply)


def test_a_failure_without_a_reply_is_recorded_by_its_reason_alone() -> None:
    """No connection: no host in the history, the reason as its reply."""
    row = result(claim(7), Outcome(Verdict.DEFERRED, 0, "4.4.1", "connect refused"), NOW, None)
    reason = "connect refused"
    assert row == Result(7, Event.TEMPFAIL, reason, NOW, 1, None, reason)
