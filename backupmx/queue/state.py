"""The recipient lifecycle: every state, every event, every transition — here and only here.

Rule 1 (after h11's ``_state.py``): anything that moves a recipient from one
state to another must be a row of `TRANSITIONS`.  The store builds its SQL
``WHERE state IN (…)`` clauses from `sources`, so a transition that is not in
the table cannot happen in the database either.

Theory of operation::

    queued ──claim──▶ sending ──success──▶ delivered
      ▲                 │──tempfail──▶ queued (next attempt after backoff)
      │                 │──permfail──▶ bounced (DSN unless NOTIFY=NEVER or sender <>)
      │                 │──quarantine──▶ held (5xx from a primary just back: on_primary_5xx=hold)
      │                 └──lease_expired──▶ queued (the worker died)
      ├──hold──▶ held ──release──▶ queued
      ├──bounce (admin, queued or held)──▶ bounced (DSN)
      └──expire──▶ expired (DSN)

Invariants: `delivered`, `bounced` and `expired` are final — nothing leaves them
(invariant 2 of docs/queue.md: every accepted recipient ends in one of them or is
deleted by an admin).  Only `sending` rows carry a lease.

A delivery attempt ends in a `Verdict` (``mail/reply.py``: what the primary's
reply means), and `VERDICT_EVENTS` is the one place that turns it into the event
applied to the `sending` recipient: a verdict names the state it leads to
(delivered, bounced, held), except ``deferred``, which goes back to ``queued``.
"""

from __future__ import annotations

from enum import StrEnum

from backupmx.mail.reply import Verdict


class State(StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    HELD = "held"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    EXPIRED = "expired"


class Event(StrEnum):
    CLAIM = "claim"
    SUCCESS = "success"
    TEMPFAIL = "tempfail"
    PERMFAIL = "permfail"
    QUARANTINE = "quarantine"
    LEASE_EXPIRED = "lease_expired"
    HOLD = "hold"
    RELEASE = "release"
    EXPIRE = "expire"
    BOUNCE = "bounce"  # an administrator's `queue bounce`


TRANSITIONS: dict[tuple[State, Event], State] = {
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

# The event a delivery attempt's verdict applies to its `sending` recipient.
VERDICT_EVENTS: dict[Verdict, Event] = {
    Verdict.DELIVERED: Event.SUCCESS,
    Verdict.DEFERRED: Event.TEMPFAIL,
    Verdict.BOUNCED: Event.PERMFAIL,
    Verdict.HELD: Event.QUARANTINE,
}

FINAL = frozenset({State.DELIVERED, State.BOUNCED, State.EXPIRED})
PENDING = frozenset(State) - FINAL  # still the queue's responsibility


class InvalidTransition(Exception):
    pass


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(f"{event} is not allowed from {state}") from None


def sources(event: Event) -> list[str]:
    """The states from which `event` may be applied (for SQL WHERE clauses)."""
    return sorted(state for (state, ev) in TRANSITIONS if ev == event)


def target(event: Event) -> str:
    """The state `event` leads to (every event has exactly one target)."""
    (result,) = {to for (_, ev), to in TRANSITIONS.items() if ev == event}
    return result


# ---------------------------------------------------------------------- the domain's primary
#
# Rule 1 holds here too: anything that changes a domain's primary state (the
# ``domains`` table) is a row of `PRIMARY_TRANSITIONS`.
#
# Theory of operation (the state after each event)::
#
#                  answered   unreachable   no_primary   retry
#       unknown    up         down          unknown      unknown
#       up         up         down          unknown      up
#       down       up         down          unknown      unknown
#
# * ANSWERED: a delivery or a probe reached a host of the domain's route → up.
#   Coming up from down or unknown makes the domain's queued mail due at once.
# * UNREACHABLE: no host of the route answered, or no route can be planned now
#   (a DNS failure, a backed-up domain's NXDOMAIN included; no MX better than
#   this host) → down.  For a domain that is up, the deliverer applies it only
#   after several failures in a row (`backupmx.deliver.primaries.out_of_reach`):
#   one connection turned away by a primary at its session limit is no outage.
#   Mail of a down domain is not claimed, nor touched (`claim`): the probes
#   decide when to try again.
# * NO_PRIMARY: the route says the mail can never be delivered (a null MX, or no
#   such domain when it is not backed up here) → unknown, and the domain's mail
#   is due at once (to bounce).
# * RETRY: an operator's flush or requeue, or an ETRN: a down domain is tried
#   again (unknown); up and unknown stay as they are.
#
# A domain's row starts `unknown`.  Every event can happen in every state, so
# the table is total; an event that changes the state always leads to the same
# one (`primary_target`), which is how the store writes it in SQL.


class PrimaryState(StrEnum):
    UP = "up"
    DOWN = "down"
    UNKNOWN = "unknown"


class PrimaryEvent(StrEnum):
    ANSWERED = "answered"
    UNREACHABLE = "unreachable"
    NO_PRIMARY = "no_primary"
    RETRY = "retry"


PRIMARY_TRANSITIONS: dict[tuple[PrimaryState, PrimaryEvent], PrimaryState] = {
    (PrimaryState.UNKNOWN, PrimaryEvent.ANSWERED): PrimaryState.UP,
    (PrimaryState.UP, PrimaryEvent.ANSWERED): PrimaryState.UP,
    (PrimaryState.DOWN, PrimaryEvent.ANSWERED): PrimaryState.UP,
    (PrimaryState.UNKNOWN, PrimaryEvent.UNREACHABLE): PrimaryState.DOWN,
    (PrimaryState.UP, PrimaryEvent.UNREACHABLE): PrimaryState.DOWN,
    (PrimaryState.DOWN, PrimaryEvent.UNREACHABLE): PrimaryState.DOWN,
    (PrimaryState.UNKNOWN, PrimaryEvent.NO_PRIMARY): PrimaryState.UNKNOWN,
    (PrimaryState.UP, PrimaryEvent.NO_PRIMARY): PrimaryState.UNKNOWN,
    (PrimaryState.DOWN, PrimaryEvent.NO_PRIMARY): PrimaryState.UNKNOWN,
    (PrimaryState.UNKNOWN, PrimaryEvent.RETRY): PrimaryState.UNKNOWN,
    (PrimaryState.UP, PrimaryEvent.RETRY): PrimaryState.UP,
    (PrimaryState.DOWN, PrimaryEvent.RETRY): PrimaryState.UNKNOWN,
}


def next_primary_state(state: PrimaryState, event: PrimaryEvent) -> PrimaryState:
    return PRIMARY_TRANSITIONS[(state, event)]


def primary_sources(event: PrimaryEvent) -> list[str]:
    """The states `event` changes (for SQL WHERE clauses)."""
    return sorted(s for (s, ev), to in PRIMARY_TRANSITIONS.items() if ev == event and to != s)


def primary_target(event: PrimaryEvent) -> PrimaryState:
    """The state `event` leads to whenever it changes the state."""
    (result,) = {to for (s, ev), to in PRIMARY_TRANSITIONS.items() if ev == event and to != s}
    return result
