"""Greylisting policy as a pure function (`backupmx.receive.greylist.decide`):
what a triplet's entry becomes when the triplet is seen, and how long it still waits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from backupmx.config import Greylist
from backupmx.queue.records import GreylistEntry
from backupmx.receive.greylist import GREYLIST_REFRESH, decide

SETTINGS = Greylist(enabled=True, delay=300, retry_window=2 * 86400, pass_ttl=35 * 86400)
T0 = datetime(2026, 1, 1, tzinfo=UTC)
WAITING = GreylistEntry(first_seen=T0, last_seen=T0, passed_at=None)
PASSED = GreylistEntry(first_seen=T0, last_seen=T0, passed_at=T0)


def test_a_new_triplet_starts_waiting_the_whole_delay() -> None:
    entry, wait = decide(None, T0, SETTINGS)
    assert entry == WAITING
    assert wait == 300.0


def test_a_retry_within_the_delay_waits_the_rest_and_writes_nothing() -> None:
    entry, wait = decide(WAITING, T0 + timedelta(minutes=1), SETTINGS)
    assert entry is WAITING
    assert wait == 240.0


def test_a_retry_after_the_delay_passes_and_is_remembered_as_passed() -> None:
    now = T0 + timedelta(seconds=300)  # the delay to the second is enough
    assert decide(WAITING, now, SETTINGS) == (
        GreylistEntry(first_seen=T0, last_seen=now, passed_at=now),
        0.0,
    )


def test_a_retry_at_the_end_of_the_retry_window_still_passes() -> None:
    now = T0 + timedelta(seconds=300 + 2 * 86400)
    entry, wait = decide(WAITING, now, SETTINGS)
    assert (entry.passed_at, wait) == (now, 0.0)


def test_a_retry_after_the_retry_window_starts_over() -> None:
    now = T0 + timedelta(seconds=300 + 2 * 86400, microseconds=1)
    assert decide(WAITING, now, SETTINGS) == (GreylistEntry(now, now, None), 300.0)


def test_a_passed_triplet_seen_again_soon_passes_without_a_write() -> None:
    entry, wait = decide(PASSED, T0 + GREYLIST_REFRESH, SETTINGS)
    assert entry is PASSED
    assert wait == 0.0


def test_a_passed_triplet_seen_after_the_refresh_interval_updates_last_seen() -> None:
    now = T0 + GREYLIST_REFRESH + timedelta(seconds=1)
    assert decide(PASSED, now, SETTINGS) == (GreylistEntry(T0, now, T0), 0.0)


def test_a_passed_triplet_stays_passed_while_seen_within_pass_ttl() -> None:
    now = T0 + timedelta(days=35)
    entry, wait = decide(PASSED, now, SETTINGS)
    assert (entry.passed_at, entry.last_seen, wait) == (T0, now, 0.0)


def test_a_passed_triplet_unseen_longer_than_pass_ttl_starts_over() -> None:
    now = T0 + timedelta(days=35, seconds=1)
    assert decide(PASSED, now, SETTINGS) == (GreylistEntry(now, now, None), 300.0)


def test_the_wait_follows_the_configured_delay() -> None:
    quick = Greylist(enabled=True, delay=2, retry_window=60, pass_ttl=3600)
    assert decide(None, T0, quick)[1] == 2.0
    assert decide(GreylistEntry(T0, T0, None), T0 + timedelta(seconds=1), quick)[1] == 1.0
