"""The verdict of a delivery attempt, as an event of the recipient table.

A recipient being delivered is in `sending`; whatever the primary answered, the
verdict's event must be legal from there and lead where the verdict says.
"""

from __future__ import annotations

import pytest

from backupmx.mail.reply import Verdict
from backupmx.queue.state import (
    FINAL,
    VERDICT_EVENTS,
    Event,
    State,
    next_state,
    sources,
)

WHERE_IT_LEADS = {
    Verdict.DELIVERED: State.DELIVERED,
    Verdict.DEFERRED: State.QUEUED,
    Verdict.BOUNCED: State.BOUNCED,
    Verdict.HELD: State.HELD,
}


def test_every_verdict_has_an_event() -> None:
    assert set(VERDICT_EVENTS) == set(Verdict)


@pytest.mark.parametrize("verdict", list(Verdict))
def test_a_verdicts_event_is_legal_for_a_recipient_being_delivered(verdict: Verdict) -> None:
    assert State.SENDING.value in sources(VERDICT_EVENTS[verdict])


@pytest.mark.parametrize("verdict", list(Verdict))
def test_a_verdict_leads_to_the_state_it_names(verdict: Verdict) -> None:
    assert next_state(State.SENDING, VERDICT_EVENTS[verdict]) is WHERE_IT_LEADS[verdict]


def test_deferred_and_held_recipients_stay_the_queues_responsibility() -> None:
    pending = [v for v in Verdict if next_state(State.SENDING, VERDICT_EVENTS[v]) not in FINAL]
    assert pending == [Verdict.DEFERRED, Verdict.HELD]


def test_verdicts_other_than_deferred_carry_their_states_name() -> None:
    for verdict, state in WHERE_IT_LEADS.items():
        if verdict is not Verdict.DEFERRED:
            assert verdict.value == state.value


def test_two_verdicts_never_share_an_event() -> None:
    assert len(set(VERDICT_EVENTS.values())) == len(VERDICT_EVENTS)


def test_no_verdict_is_an_administrators_or_the_sweeps_event() -> None:
    foreign = {Event.CLAIM, Event.LEASE_EXPIRED, Event.HOLD, Event.RELEASE, Event.EXPIRE}
    assert not (foreign | {Event.BOUNCE}) & set(VERDICT_EVENTS.values())
