"""The recipient state machine: every transition of the table, and none besides."""

from __future__ import annotations

import pytest

from backupmx.queue.state import (
    FINAL,
    TRANSITIONS,
    Event,
    InvalidTransition,
    State,
    next_state,
    sources,
)

EXPECTED = {
    (State.QUEUED, Event.CLAIM): State.SENDING,
    (State.SENDING, Event.SUCCESS): State.DELIVERED,
    (State.SENDING, Event.TEMPFAIL): State.QUEUED,
    (State.SENDING, Event.PERMFAIL): State.BOUNCED,
    (State.SENDING, Event.QUARANTINE): State.HELD,
    (State.SENDING, Event.LEASE_EXPIRED): State.QUEUED,
    (State.QUEUED, Event.HOLD): State.HELD,
    (State.HELD, Event.RELEASE): State.QUEUED,
    (State.QUEUED, Event.EXPIRE): State.EXPIRED,
    (State.HELD, Event.EXPIRE): State.EXPIRED,
    (State.QUEUED, Event.BOUNCE): State.BOUNCED,
    (State.HELD, Event.BOUNCE): State.BOUNCED,
}


def test_every_transition() -> None:
    for state in State:
        for event in Event:
            if (state, event) in EXPECTED:
                assert next_state(state, event) is EXPECTED[(state, event)]
            else:
                with pytest.raises(InvalidTransition):
                    next_state(state, event)
    assert TRANSITIONS == EXPECTED


def test_final_states_are_never_left() -> None:
    assert not [key for key in TRANSITIONS if key[0] in FINAL]


def test_sources_feed_sql() -> None:
    assert sources(Event.EXPIRE) == ["held", "queued"]
