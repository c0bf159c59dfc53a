"""The recipient state machine (`backupmx.queue.state.TRANSITIONS`), checked by its
properties rather than by a copy of the table: every pair of state and event is
walked, every state is reachable, final states have no exits, every event is
handled somewhere and always leads to one state."""

from __future__ import annotations

import itertools

import pytest

from backupmx.queue.state import (
    FINAL,
    PENDING,
    TRANSITIONS,
    Event,
    InvalidTransition,
    State,
    next_state,
    sources,
    target,
)

PAIRS = list(itertools.product(State, Event))
NEW = State.QUEUED  # every recipient enters the table here (invariant 1: stored as queued)


def reachable(start: State) -> set[State]:
    seen, frontier = {start}, [start]
    while frontier:
        state = frontier.pop()
        for (source, _), following in TRANSITIONS.items():
            if source is state and following not in seen:
                seen.add(following)
                frontier.append(following)
    return seen


@pytest.mark.parametrize(("state", "event"), PAIRS)
def test_every_pair_is_a_row_of_the_table_or_refused(state: State, event: Event) -> None:
    if (state, event) in TRANSITIONS:
        assert next_state(state, event) is TRANSITIONS[(state, event)]
    else:
        with pytest.raises(InvalidTransition, match=f"{event} is not allowed from {state}"):
            next_state(state, event)


def test_every_state_is_reachable_from_a_new_recipient() -> None:
    assert reachable(NEW) == set(State)


def test_final_states_are_never_left() -> None:
    assert not [key for key in TRANSITIONS if key[0] in FINAL]


def test_every_pending_state_can_still_end() -> None:
    for state in PENDING:
        assert reachable(state) & FINAL, f"{state} can never become final"


def test_final_and_pending_split_the_states() -> None:
    assert set(State) == FINAL | PENDING
    assert not FINAL & PENDING


def test_every_event_is_handled_in_some_state() -> None:
    assert {event for (_, event) in TRANSITIONS} == set(Event)


@pytest.mark.parametrize("event", list(Event))
def test_an_event_always_leads_to_one_state(event: Event) -> None:
    assert {TRANSITIONS[(s, event)] for s in State if (s, event) in TRANSITIONS} == {target(event)}


@pytest.mark.parametrize("event", list(Event))
def test_sources_are_the_states_that_accept_the_event(event: Event) -> None:
    accepting = []
    for state in State:
        try:
            next_state(state, event)
        except InvalidTransition:
            continue
        accepting.append(state.value)
    assert sources(event) == sorted(accepting)


def test_only_a_recipient_being_delivered_becomes_delivered() -> None:
    assert [key for key, to in TRANSITIONS.items() if to is State.DELIVERED] == [
        (State.SENDING, Event.SUCCESS)
    ]


def test_every_pending_recipient_can_still_be_delivered() -> None:
    for state in PENDING:
        assert State.DELIVERED in reachable(state), state


def test_the_stored_strings_are_the_recipient_tables_values() -> None:
    assert {state.value for state in State} == {
        "queued",
        "sending",
        "held",
        "delivered",
        "bounced",
        "expired",
    }
