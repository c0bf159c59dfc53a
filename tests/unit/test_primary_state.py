"""The domain's primary state machine (`backupmx.queue.state.PRIMARY_TRANSITIONS`),
checked by its properties rather than by a copy of the table."""

from __future__ import annotations

import itertools

import pytest

from backupmx.queue.state import (
    PRIMARY_TRANSITIONS,
    PrimaryEvent,
    PrimaryState,
    next_primary_state,
    primary_sources,
    primary_target,
)

PAIRS = list(itertools.product(PrimaryState, PrimaryEvent))


def reachable(start: PrimaryState) -> set[PrimaryState]:
    seen, frontier = {start}, [start]
    while frontier:
        state = frontier.pop()
        for event in PrimaryEvent:
            following = next_primary_state(state, event)
            if following not in seen:
                seen.add(following)
                frontier.append(following)
    return seen


def test_the_stored_strings_are_the_domains_tables_values() -> None:
    assert {state.value for state in PrimaryState} == {"up", "down", "unknown"}


@pytest.mark.parametrize(("state", "event"), PAIRS)
def test_every_event_is_handled_in_every_state(state: PrimaryState, event: PrimaryEvent) -> None:
    assert next_primary_state(state, event) in PrimaryState


def test_the_table_has_no_row_beyond_the_states_and_events() -> None:
    assert set(PRIMARY_TRANSITIONS) == set(PAIRS)


def test_every_state_is_reachable_from_a_new_domain_and_from_each_other() -> None:
    assert reachable(PrimaryState.UNKNOWN) == set(PrimaryState)
    for state in PrimaryState:  # no state is a dead end: a domain can always recover
        assert reachable(state) == set(PrimaryState)


@pytest.mark.parametrize("event", list(PrimaryEvent))
def test_an_event_that_changes_the_state_always_leads_to_the_same_one(
    event: PrimaryEvent,
) -> None:
    for state in PrimaryState:
        following = next_primary_state(state, event)
        changed = following != state
        assert changed == (state in primary_sources(event))
        if changed:
            assert following == primary_target(event)


def test_an_answer_means_up_and_no_answer_means_down_whatever_was_known() -> None:
    for state in PrimaryState:
        assert next_primary_state(state, PrimaryEvent.ANSWERED) is PrimaryState.UP
        assert next_primary_state(state, PrimaryEvent.UNREACHABLE) is PrimaryState.DOWN


def test_a_domain_without_a_primary_is_never_parked_as_down() -> None:
    for state in PrimaryState:
        assert next_primary_state(state, PrimaryEvent.NO_PRIMARY) is not PrimaryState.DOWN


def test_a_retry_only_releases_a_down_domain() -> None:
    assert primary_sources(PrimaryEvent.RETRY) == [PrimaryState.DOWN]
    assert next_primary_state(PrimaryState.DOWN, PrimaryEvent.RETRY) is PrimaryState.UNKNOWN
    assert next_primary_state(PrimaryState.UP, PrimaryEvent.RETRY) is PrimaryState.UP
