"""The inventory: what the queue holds, read for people and for the metrics.

Listings of messages with their recipients (``backupmx queue list``, the bulk
actions' selections), one message and its body (``queue show``), the counts by
state and domain (``queue stats``, ``status``, the metrics), the ages of
pending messages (``status``) and the nodes sharing the queue with the
recipients each has in flight (``backupmx nodes``, ``status``).  Read-only:
nothing here changes the queue.

Promises: a listing of millions of messages is read a page at a time along the
primary key, each page on its own connection, so it holds neither the queue in
memory nor a read snapshot open for its whole run; counts are grouped queries,
so the status screen stays quick during a long outage.  Unknown queue ids
raise `UnknownMessage`.  Finished messages (all recipients final, body removed)
are listed only with ``include_final``, until ``keep_finished`` removes them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from backupmx.queue.database import QueueDatabase
from backupmx.queue.models import bodies, domains, messages, nodes, recipients
from backupmx.queue.records import (
    DomainStats,
    MessageView,
    NodeView,
    RecipientView,
    Stats,
    UnknownMessage,
    node_state,
    oldest_first,
    utcnow,
)
from backupmx.queue.state import PENDING, PrimaryState, State

_MESSAGE_COLUMNS = list(messages.c)
_PENDING = sorted(PENDING)


class Inventory(QueueDatabase):
    async def messages(
        self, *, include_final: bool = False, domain: str | None = None
    ) -> list[MessageView]:
        """Messages oldest first; by default only those with a recipient still pending."""
        pages = self.message_pages(include_final=include_final, domain=domain)
        return oldest_first([message async for page in pages for message in page])

    async def message_pages(
        self, *, include_final: bool = False, domain: str | None = None, size: int = 1000
    ) -> AsyncIterator[list[MessageView]]:
        """The messages of `messages`, `size` at a time in queue-id order (arrival,
        to the microsecond), each page read on its own along the primary key: a bulk
        action over a queue of millions holds one page, not the queue, and holds no
        read snapshot open for its whole run."""
        query = select(*_MESSAGE_COLUMNS).order_by(messages.c.id)
        if not include_final:
            query = query.where(messages.c.finished_at.is_(None))
        if domain:
            wanted = select(recipients.c.id).where(
                recipients.c.message_id == messages.c.id,
                recipients.c.domain == domain.lower(),
            )
            if not include_final:
                wanted = wanted.where(recipients.c.state.in_(_PENDING))
            query = query.where(wanted.exists())
        after = ""
        while True:
            async with self.engine.connect() as conn:
                page = query.where(messages.c.id > after).limit(size)
                rows = (await conn.execute(page)).all()
                views = await _views(conn, rows)
            if views:
                yield views
            if len(rows) < size:
                return
            after = rows[-1].id

    async def message(self, message_id: str) -> MessageView:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(select(*_MESSAGE_COLUMNS).where(messages.c.id == message_id))
            ).all()
            if not rows:
                raise UnknownMessage([message_id])
            return (await _views(conn, rows))[0]

    async def body(self, message_id: str) -> bytes:
        """The stored message; empty once the message is finished (`MessageView.finished_at`)."""
        query = (
            select(messages.c.id, bodies.c.body)
            .select_from(messages.outerjoin(bodies, bodies.c.message_id == messages.c.id))
            .where(messages.c.id == message_id)
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            raise UnknownMessage([message_id])
        return bytes(row.body or b"")

    async def stats(self) -> Stats:
        per_domain = (
            select(
                recipients.c.domain,
                recipients.c.state,
                func.count(),
                func.min(messages.c.received_at),
            )
            .join(messages, messages.c.id == recipients.c.message_id)
            .where(recipients.c.state.in_(_PENDING))
            .group_by(recipients.c.domain, recipients.c.state)
        )
        per_state = select(recipients.c.state, func.count()).group_by(recipients.c.state)
        pending_messages = select(func.count(func.distinct(recipients.c.message_id))).where(
            recipients.c.state.in_(_PENDING)
        )
        async with self.engine.connect() as conn:
            domain_rows = (await conn.execute(per_domain)).all()
            state_rows = (await conn.execute(per_state)).all()
            message_count = (await conn.execute(pending_messages)).scalar() or 0
        totals = {state.value: 0 for state in State}
        totals.update({state: count for state, count in state_rows})
        domains: dict[str, tuple[dict[str, int], datetime | None]] = {}
        for domain, state, count, oldest in domain_rows:
            counts, first = domains.setdefault(domain, ({s.value: 0 for s in PENDING}, None))
            counts[state] = count
            domains[domain] = (
                counts,
                oldest if first is None or (oldest and oldest < first) else first,
            )
        domain_stats = [DomainStats(d, c, o) for d, (c, o) in sorted(domains.items())]
        oldest_values = [d.oldest for d in domain_stats if d.oldest]
        return Stats(message_count, totals, min(oldest_values, default=None), domain_stats)

    async def nodes(self, lease: timedelta) -> list[NodeView]:
        """Every node that has written a heartbeat, by name; live if it has not stopped
        and its last heartbeat is at most `lease` old by the database's clock (as the
        nodes themselves decide).  Its recipients in flight are counted in the queue
        (the ``sending`` rows it owns), beside what it reported."""
        sending = (
            select(recipients.c.lease_owner, func.count().label("count"))
            .where(recipients.c.state == State.SENDING)
            .group_by(recipients.c.lease_owner)
            .subquery()
        )
        query = (
            select(nodes, func.coalesce(sending.c.count, 0).label("sending"))
            .outerjoin(sending, sending.c.lease_owner == nodes.c.name)
            .order_by(nodes.c.name)
        )
        async with self.engine.connect() as conn:
            now = await self.database_now(conn)
            rows = (await conn.execute(query)).all()
        views = []
        for row in rows:
            age = (now - row.last_seen).total_seconds()
            views.append(
                NodeView(
                    row.name, row.hostname, row.version, row.listen, row.pid, row.started_at,
                    row.last_seen, age, row.stopped_at,
                    node_state(age, row.stopped_at, lease.total_seconds()),
                    row.sending, row.in_flight, row.delivered, row.delivery_rate,
                )
            )  # fmt: skip
        return views

    async def pending_ages(
        self, bounds: Sequence[timedelta], now: datetime | None = None
    ) -> list[int]:
        """Messages with a recipient pending, counted by age: younger than ``bounds[0]``,
        then between consecutive bounds, then the rest.  One grouped query, so the
        status screen stays quick when an outage has queued a million messages."""
        now = now or utcnow()
        younger = [func.sum(case((messages.c.received_at > now - b, 1), else_=0)) for b in bounds]
        pending = select(recipients.c.message_id).where(recipients.c.state.in_(_PENDING))
        query = select(func.count(), *younger).where(messages.c.id.in_(pending.distinct()))
        async with self.engine.connect() as conn:
            total, *within = (await conn.execute(query)).one()
        cumulative = [int(n or 0) for n in within] + [int(total)]
        return [n - previous for previous, n in zip([0, *cumulative], cumulative, strict=False)]


async def _views(conn: AsyncConnection, rows: Sequence[Row[Any]]) -> list[MessageView]:
    by_message: dict[str, list[RecipientView]] = {row.id: [] for row in rows}
    ids = list(by_message)
    # Mail never tried because its primary is down says why it waits: the domain's reason.
    down = select(domains.c.name, domains.c.reason).where(domains.c.state == PrimaryState.DOWN)
    waiting = {name: reason for name, reason in await conn.execute(down)}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        result = await conn.execute(
            select(recipients).where(recipients.c.message_id.in_(chunk)).order_by(recipients.c.id)
        )
        for r in result:
            last_error = r.last_error
            if last_error is None and r.state == State.QUEUED:
                last_error = waiting.get(r.domain)
            by_message[r.message_id].append(
                RecipientView(
                    r.id, r.address, r.domain, r.state, r.attempts, r.next_attempt_at,
                    last_error, r.dsn_notify, r.dsn_orcpt,
                    r.lease_owner if r.state == State.SENDING else None,
                )
            )  # fmt: skip
    return [
        MessageView(
            row.id,
            row.sender,
            row.size,
            row.sha256,
            row.received_at,
            row.client_ip,
            row.client_helo,
            row.protocol,
            row.tls,
            row.body_type,
            row.smtputf8,
            row.dsn_ret,
            row.dsn_envid,
            by_message[row.id],
            row.finished_at,
        )
        for row in rows
    ]
