"""Operator actions on messages: hold, release, delete.

Each acts on whole messages named by queue id, in one transaction, and raises
`UnknownMessage` naming every id that is not in the queue (then nothing is
changed).  Hold and release are transitions of `backupmx.queue.state` and touch
only the recipients the transition allows (a delivered recipient stays
delivered); delete removes the message and all its recipients, whatever their
state, unless one is being sent (below).  A flush (`make_due`) and a bounce (`sweep`) are in
`backupmx.queue.claims` and `backupmx.queue.results`, beside the deliverer's use
of them.

A recipient in ``sending`` is in a node's hands: hold cannot stop that delivery,
and delete leaves a message with such a recipient alone (its node would send
it all the same).  Both say which recipients they left for that reason
(`Acted.in_flight`), read in the transaction that acted: the pending
recipients are locked first (``FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN
IMMEDIATE`` holds the whole database), so no claim or result slips in between
what was seen and what was done.  `in_flight` is the same question without
acting, for an operator who waits for those deliveries to end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from backupmx.queue.database import QueueDatabase
from backupmx.queue.models import bodies, messages, recipients
from backupmx.queue.records import Acted, InFlight, utcnow
from backupmx.queue.state import PENDING, Event, State, sources, target

_PENDING = sorted(PENDING)


class Admin(QueueDatabase):
    async def hold(self, ids: Sequence[str]) -> Acted:
        """Queued recipients of these messages become held; those being sent stay so."""
        async with self.engine.begin() as conn:
            await self._require(conn, ids)
            in_flight = await _lock_pending(conn, ids)
            held = await _transition(conn, ids, Event.HOLD, {})
        return Acted(held, in_flight)

    async def release(self, ids: Sequence[str]) -> int:
        async with self.engine.begin() as conn:
            await self._require(conn, ids)
            return await _transition(conn, ids, Event.RELEASE, {"next_attempt_at": utcnow()})

    async def delete(self, ids: Sequence[str]) -> Acted:
        """Remove these messages and all their recipients, except the messages with a
        recipient being sent."""
        async with self.engine.begin() as conn:
            await self._require(conn, ids)
            in_flight = await _lock_pending(conn, ids)
            busy = {r.message_id for r in in_flight}
            idle = [i for i in ids if i not in busy]
            await conn.execute(delete(recipients).where(recipients.c.message_id.in_(idle)))
            await conn.execute(delete(bodies).where(bodies.c.message_id.in_(idle)))
            outcome = await conn.execute(delete(messages).where(messages.c.id.in_(idle)))
        return Acted(outcome.rowcount, in_flight)

    async def in_flight(self, ids: Sequence[str]) -> list[InFlight]:
        """The recipients of these messages that a node is sending now."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(_pending_of(ids).where(recipients.c.state == State.SENDING))
            return [InFlight(r.message_id, r.address, r.lease_owner) for r in rows]


def _pending_of(ids: Sequence[str]) -> Any:
    return (
        select(recipients.c.message_id, recipients.c.address, recipients.c.state,
               recipients.c.lease_owner)
        .where(recipients.c.message_id.in_(ids), recipients.c.state.in_(_PENDING))
        .order_by(recipients.c.id)
    )  # fmt: skip


async def _lock_pending(conn: AsyncConnection, ids: Sequence[str]) -> list[InFlight]:
    """Lock the pending recipients of these messages until the transaction ends (a claim
    skips them, a result waits), and return those being sent.  In id order, the order
    in which two of these transactions lock, so that they do not deadlock each other."""
    rows = await conn.execute(_pending_of(ids).with_for_update())
    return [
        InFlight(r.message_id, r.address, r.lease_owner) for r in rows if r.state == State.SENDING
    ]


async def _transition(
    conn: AsyncConnection, ids: Sequence[str], event: Event, extra: dict[str, Any]
) -> int:
    outcome = await conn.execute(
        update(recipients)
        .where(recipients.c.message_id.in_(ids), recipients.c.state.in_(sources(event)))
        .values(state=target(event), updated_at=utcnow(), **extra)
    )
    return outcome.rowcount
