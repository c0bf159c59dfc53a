"""The retry schedule and expiry (deliver/schedule.py) as pure functions of time.

retry_min 300 s and retry_max 4000 s are the [delivery] defaults (Postfix's
minimal and maximal backoff).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from backupmx.deliver.schedule import backoff, expires_before, next_attempt, warns_before

MIN, MAX = 300.0, 4000.0
NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


class Jitter(random.Random):
    """An rng whose jitter factor is fixed: 0.9 and 1.1 are the two extremes."""

    def __init__(self, factor: float) -> None:
        super().__init__(0)
        self.factor = factor

    def uniform(self, a: float, b: float) -> float:
        assert (a, b) == (0.9, 1.1)
        return self.factor


def test_the_wait_doubles_with_each_attempt_until_retry_max() -> None:
    waits = [backoff(n, MIN, MAX, Jitter(1.0)) for n in range(1, 7)]
    assert waits == [300.0, 600.0, 1200.0, 2400.0, 4000.0, 4000.0]


def test_no_attempt_yet_waits_as_the_first_failed_one() -> None:
    assert backoff(0, MIN, MAX, Jitter(1.0)) == backoff(1, MIN, MAX, Jitter(1.0)) == MIN


@pytest.mark.parametrize("attempts", [63, 64, 1000, 10**9])
def test_a_recipient_tried_for_weeks_waits_retry_max_without_overflow(attempts: int) -> None:
    assert backoff(attempts, MIN, MAX, Jitter(1.0)) == MAX


def test_jitter_spreads_by_ten_percent_either_way() -> None:
    assert backoff(3, MIN, MAX, Jitter(0.9)) == pytest.approx(1080.0)
    assert backoff(3, MIN, MAX, Jitter(1.1)) == pytest.approx(1320.0)


def test_jitter_never_goes_below_retry_min_nor_above_retry_max() -> None:
    assert backoff(1, MIN, MAX, Jitter(0.9)) == MIN
    assert backoff(20, MIN, MAX, Jitter(1.1)) == MAX


def test_recipients_deferred_together_do_not_come_due_together() -> None:
    rng = random.Random(7)
    waits = {backoff(4, MIN, MAX, rng) for _ in range(50)}
    assert len(waits) > 40
    assert all(2160.0 <= w <= 2640.0 for w in waits)


def test_equal_bounds_give_a_fixed_interval() -> None:
    assert {backoff(n, 60.0, 60.0, random.Random(n)) for n in range(1, 10)} == {60.0}


def test_the_next_attempt_is_now_plus_the_backoff() -> None:
    assert next_attempt(NOW, 2, MIN, MAX, Jitter(1.0)) == NOW + timedelta(seconds=600)


def test_mail_received_before_the_queue_lifetime_expires() -> None:
    assert expires_before(NOW, 5 * 86400) == NOW - timedelta(days=5)


def test_a_lifetime_of_zero_expires_everything_received_until_now() -> None:
    assert expires_before(NOW, 0) == NOW


def test_delay_warnings_go_to_mail_older_than_delay_warning() -> None:
    assert warns_before(NOW, 4 * 3600) == NOW - timedelta(hours=4)


def test_a_delay_warning_of_zero_is_off() -> None:
    assert warns_before(NOW, 0) is None
