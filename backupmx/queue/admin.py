"""Operator actions on recipients: hold, release, delete.

Each acts on the recipients named by their ids (`RecipientView.id`, as a
`backupmx.queue.selection.Selection` chose them), in one transaction; an id
that is no longer in the queue is skipped.  Hold and release are transitions of
`backupmx.queue.state` and touch only the recipients the transition allows (a
delivered recipient stays delivered).  Delete removes the recipients, whatever
their state, unless one is being sent (below); a message goes with its last
recipient (row and body), and a message left with final recipients only is
finished (`backupmx.queue.retention.finish`: its body goes, its record stays for
``keep_finished``).  A flush or requeue (`make_due`) and a bounce (`sweep`) are
in `backupmx.queue.claims` and `backupmx.queue.results`, beside the deliverer's
use of them.

A recipient in ``sending`` is in a node's hands: neither hold nor delete can
stop that delivery, so both leave it alone and say so (`Acted.in_flight`), read
in the transaction that acted: the pending recipients are locked first (``FOR
UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` holds the whole database),
so no claim or result slips in between what was seen and what was done.
`in_flight` is the same question without acting, for an operator who waits for
those deliveries to end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from backupmx.queue.database import QueueDatabase
from backupmx.queue.models import bodies, messages, recipients
from backupmx.queue.records import Acted, InFlight, utcnow
from backupmx.queue.retention import finish
from backupmx.queue.state import PENDING, Event, State, sources, target

_PENDING = sorted(PENDING)


class Admin(QueueDatabase):
    async def hold(self, recipient_ids: Sequence[int]) -> Acted:
        """Those of these recipients that are queued become held; those being sent stay so."""
        async with self.engine.begin() as conn:
            in_flight = await _lock_pending(conn, recipient_ids)
            held = await _transition(conn, recipient_ids, Event.HOLD, {})
        return Acted(held, [_in_flight(r) for r in in_flight])

    async def release(self, recipient_ids: Sequence[int]) -> int:
        """Those of these recipients that are held become queued, due now."""
        async with self.engine.begin() as conn:
            return await _transition(
                conn, recipient_ids, Event.RELEASE, {"next_attempt_at": utcnow()}
            )

    async def delete(self, recipient_ids: Sequence[int]) -> Acted:
        """Remove these recipients, except those being sent, and the messages left with
        no recipient; finish those left with final recipients only."""
        async with self.engine.begin() as conn:
            in_flight = await _lock_pending(conn, recipient_ids)
            busy = {r.id for r in in_flight}
            idle = [i for i in recipient_ids if i not in busy]
            of_idle = select(recipients.c.message_id).where(recipients.c.id.in_(idle))
            touched = list((await conn.execute(of_idle.distinct())).scalars())
            removed = await conn.execute(delete(recipients).where(recipients.c.id.in_(idle)))
            left = select(recipients.c.id).where(recipients.c.message_id == messages.c.id)
            empty = list(
                (
                    await conn.execute(
                        select(messages.c.id).where(messages.c.id.in_(touched), ~left.exists())
                    )
                ).scalars()
            )
            await conn.execute(delete(bodies).where(bodies.c.message_id.in_(empty)))
            await conn.execute(delete(messages).where(messages.c.id.in_(empty)))
            for statement in finish(touched, utcnow()):
                await conn.execute(statement)
        return Acted(removed.rowcount, [_in_flight(r) for r in in_flight], len(empty))

    async def in_flight(self, recipient_ids: Sequence[int]) -> list[InFlight]:
        """Those of these recipients that a node is sending now."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                _pending(recipient_ids).where(recipients.c.state == State.SENDING)
            )
            return [_in_flight(r) for r in rows]


def _pending(recipient_ids: Sequence[int]) -> Any:
    return (
        select(recipients.c.id, recipients.c.message_id, recipients.c.address,
               recipients.c.state, recipients.c.lease_owner)
        .where(recipients.c.id.in_(recipient_ids), recipients.c.state.in_(_PENDING))
        .order_by(recipients.c.id)
    )  # fmt: skip


def _in_flight(row: Row[Any]) -> InFlight:
    return InFlight(row.message_id, row.address, row.lease_owner)


async def _lock_pending(conn: AsyncConnection, recipient_ids: Sequence[int]) -> list[Row[Any]]:
    """Lock those of these recipients that are pending until the transaction ends (a
    claim skips them, a result waits), and return those being sent.  In id order, the
    order in which two of these transactions lock, so that they do not deadlock each
    other."""
    rows = await conn.execute(_pending(recipient_ids).with_for_update())
    return [r for r in rows if r.state == State.SENDING]


async def _transition(
    conn: AsyncConnection, recipient_ids: Sequence[int], event: Event, extra: dict[str, Any]
) -> int:
    outcome = await conn.execute(
        update(recipients)
        .where(recipients.c.id.in_(recipient_ids), recipients.c.state.in_(sources(event)))
        .values(state=target(event), updated_at=utcnow(), **extra)
    )
    return outcome.rowcount
