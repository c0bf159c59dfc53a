"""Operator actions on messages: hold, release, delete.

Each acts on whole messages named by queue id, in one transaction, and raises
`UnknownMessage` naming every id that is not in the queue (then nothing is
changed).  Hold and release are transitions of `backupmx.queue.state` and touch
only the recipients the transition allows (a delivered recipient stays
delivered); delete removes the message and all its recipients, whatever their
state.  A flush (`make_due`) and a bounce (`sweep`) are in
`backupmx.queue.claims` and `backupmx.queue.results`, beside the deliverer's use
of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, update

from backupmx.queue.database import QueueDatabase
from backupmx.queue.models import bodies, messages, recipients
from backupmx.queue.records import utcnow
from backupmx.queue.state import Event, sources, target


class Admin(QueueDatabase):
    async def hold(self, ids: Sequence[str]) -> int:
        return await self._admin_transition(ids, Event.HOLD, {})

    async def release(self, ids: Sequence[str]) -> int:
        return await self._admin_transition(ids, Event.RELEASE, {"next_attempt_at": utcnow()})

    async def delete(self, ids: Sequence[str]) -> int:
        async with self.engine.begin() as conn:
            await self._require(conn, ids)
            await conn.execute(delete(recipients).where(recipients.c.message_id.in_(ids)))
            await conn.execute(delete(bodies).where(bodies.c.message_id.in_(ids)))
            outcome = await conn.execute(delete(messages).where(messages.c.id.in_(ids)))
        return outcome.rowcount

    async def _admin_transition(
        self, ids: Sequence[str], event: Event, extra: dict[str, Any]
    ) -> int:
        now = utcnow()
        async with self.engine.begin() as conn:
            await self._require(conn, ids)
            outcome = await conn.execute(
                update(recipients)
                .where(recipients.c.message_id.in_(ids), recipients.c.state.in_(sources(event)))
                .values(state=target(event), updated_at=now, **extra)
            )
        return outcome.rowcount
