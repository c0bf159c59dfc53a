"""The queue's shape: pending mail counted by domain and by age, for ``queue shape``.

By recipient domain, each pending recipient (queued, sending, held) counts once;
by sender domain, each message with a pending recipient counts once (a message
has one sender: Postfix's ``qshape -s`` makes the same distinction).  Ages are
counted from ``received_at`` by this host's clock.

Promises: one grouped query per call, with one conditional sum per age bound
(as `Inventory.pending_ages`), so a million queued recipients cost one scan in
the database and one row per domain here, never a row per message.  Read-only.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, literal_column, select

from backupmx.queue.database import QueueDatabase
from backupmx.queue.models import messages, recipients
from backupmx.queue.records import ShapeRow, utcnow
from backupmx.queue.state import PENDING

_PENDING = sorted(PENDING)


def _sender_domain() -> Any:
    """The sender's domain in SQL, on both backends: what follows its last "@" (a quoted
    local part may hold one), lower case; "" for the null sender.  Without a function to
    find the last "@", rtrim strips every character but "@" off the end, which leaves
    the address up to its last "@", and replacing that by "" leaves the domain.  The
    constants are SQL literals, not parameters, so that PostgreSQL sees the grouped
    expression as the selected one."""
    sender = messages.c.sender
    at: Any = literal_column("'@'")
    empty: Any = literal_column("''")
    local = func.rtrim(sender, func.replace(sender, at, empty))
    return func.lower(func.replace(sender, local, empty))


class Shape(QueueDatabase):
    async def shape(
        self,
        minutes: Sequence[int],
        *,
        by_sender: bool = False,
        now: datetime | None = None,
    ) -> list[ShapeRow]:
        """Per domain with pending mail, its count in each age bucket: younger than
        ``minutes[0]``, then between consecutive bounds (ascending), then older."""
        now = now or utcnow()
        if by_sender:
            chosen = select(_sender_domain().label("domain"), messages.c.received_at).where(
                messages.c.finished_at.is_(None)
            )
        else:
            chosen = (
                select(recipients.c.domain, messages.c.received_at)
                .join(messages, messages.c.id == recipients.c.message_id)
                .where(recipients.c.state.in_(_PENDING))
            )
        pending = chosen.subquery("pending")
        younger = [
            func.sum(case((pending.c.received_at > now - timedelta(minutes=m), 1), else_=0))
            for m in minutes
        ]
        query = select(pending.c.domain, func.count(), *younger).group_by(pending.c.domain)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        shape = []
        for domain, total, *within in rows:
            cumulative = [int(n or 0) for n in within] + [int(total)]
            buckets = [n - before for before, n in zip([0, *cumulative], cumulative, strict=False)]
            shape.append(ShapeRow(domain, tuple(buckets)))
        return shape
