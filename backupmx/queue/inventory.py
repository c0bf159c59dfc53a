"""The inventory: what the queue holds, read for people and for the metrics.

Listings of messages with the recipients a `Selection` covers (``backupmx
queue list``, the actions' selections), one message and its body (``queue
show``), the counts by
state and domain (``queue stats``, ``status``, the metrics), the ages of
pending messages (``status``) and the nodes sharing the queue with the
recipients each has in flight (``backupmx nodes``, ``status``).  Read-only:
nothing here changes the queue.

Promises: a listing of millions of messages is read a page at a time in
received order (oldest first), each page on its own connection, so it holds
neither the queue in memory nor a read snapshot open for its whole run; counts
are grouped queries, so the status screen stays quick during a long outage.
`message` and `body` raise `UnknownMessage` for an unknown queue id; `unknown`
names those of a list.  Finished messages (all recipients final, body removed)
are listed only with ``include_final``, until ``keep_finished`` removes them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import LargeBinary, case, func, or_, select
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
    utcnow,
)
from backupmx.queue.selection import HEAD_BYTES, Selection, subject_of
from backupmx.queue.state import PENDING, PrimaryState, State

_MESSAGE_COLUMNS = list(messages.c)
_PENDING = sorted(PENDING)
PAGE = 1000  # messages per page of a listing: one query each, a few MB at most


class Inventory(QueueDatabase):
    async def messages(
        self, *, include_final: bool = False, domain: str | None = None
    ) -> list[MessageView]:
        """Messages oldest first, with their pending recipients (every recipient with
        `include_final`), or those of `domain`: a short queue read whole (tests)."""
        selection = Selection(domain=domain, include_final=include_final)
        return [message async for page in self.pages(selection) for message in page]

    async def pages(
        self, selection: Selection, size: int = PAGE
    ) -> AsyncIterator[list[MessageView]]:
        """The messages `selection` covers, each with its selected recipients, oldest
        first (received time, then queue id), `size` messages read at a time.

        Each page is read on its own connection, after the last one along
        (received_at, id), through ix_messages_pending for pending mail: a listing
        of a million messages holds one page, not the queue, holds no read snapshot
        open for its whole run, and sees neither a message twice nor one skipped
        when an action changes or deletes those already read.  Selected IDs are read
        `size` at a time in the order given, each page oldest first."""
        now = utcnow()
        query = _selected(selection, now).order_by(messages.c.received_at, messages.c.id)
        if selection.ids is not None:
            for start in range(0, len(selection.ids), size):
                chunk = selection.ids[start : start + size]
                page = await self._page(query.where(messages.c.id.in_(chunk)), selection, now)
                if page:
                    yield page
            return
        last: Row[Any] | None = None
        while True:
            after = query
            if last is not None:
                after = query.where(
                    messages.c.received_at >= last.received_at,
                    or_(messages.c.received_at > last.received_at, messages.c.id > last.id),
                )
            async with self.engine.connect() as conn:
                rows = (await conn.execute(after.limit(size))).all()
                page = await _narrowed(conn, rows, selection, now)
            if page:
                yield page
            if len(rows) < size:
                return
            last = rows[-1]

    async def _page(self, query: Any, selection: Selection, now: datetime) -> list[MessageView]:
        async with self.engine.connect() as conn:
            return await _narrowed(conn, (await conn.execute(query)).all(), selection, now)

    async def unknown(self, ids: Sequence[str]) -> list[str]:
        """The queue ids among `ids` that name no message in the queue, in their order."""
        found: set[str] = set()
        async with self.engine.connect() as conn:
            for start in range(0, len(ids), PAGE):
                chunk = ids[start : start + PAGE]
                known = select(messages.c.id).where(messages.c.id.in_(chunk))
                found.update((await conn.execute(known)).scalars())
        return [i for i in ids if i not in found]

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


def _selected(selection: Selection, now: datetime) -> Any:
    """The messages query of a selection, narrowed in SQL as far as SQL goes."""
    query = select(*_MESSAGE_COLUMNS)
    if selection.only_pending:  # ix_messages_pending, in received order
        query = query.where(messages.c.finished_at.is_(None))
    if (before := selection.received_before(now)) is not None:
        query = query.where(messages.c.received_at < before)
    if (after := selection.received_after(now)) is not None:
        query = query.where(messages.c.received_at > after)
    if selection.larger_than is not None:
        query = query.where(messages.c.size > selection.larger_than)
    if selection.state is not None or selection.domain is not None:
        wanted = select(recipients.c.id).where(
            recipients.c.message_id == messages.c.id, *_recipient_terms(selection)
        )
        query = query.where(wanted.exists())
    return query


def _recipient_terms(selection: Selection) -> list[Any]:
    terms: list[Any] = []
    if (states := selection.states) is not None:
        # state || '': no index on state for this term, so that the planner walks the
        # page's recipients (ix_recipients_message), not every one in these states.
        terms.append((recipients.c.state + "").in_(states))
    if selection.domain is not None:
        terms.append(recipients.c.domain == selection.domain)
    return terms


async def _narrowed(
    conn: AsyncConnection, rows: Sequence[Row[Any]], selection: Selection, now: datetime
) -> list[MessageView]:
    """The messages of `rows` as `selection` narrows them (each with its selected
    recipients; none without one)."""
    views = await _views(conn, rows, _recipient_terms(selection))
    subjects: dict[str, str] = {}
    if selection.needs_subject:
        subjects = await _subjects(conn, [v.id for v in views if v.recipients])
    narrowed = (selection.narrow(v, now, subjects.get(v.id, "")) for v in views)
    return [m for m in narrowed if m is not None]


async def _subjects(conn: AsyncConnection, ids: Sequence[str]) -> dict[str, str]:
    """The Subject of each message, decoded from the start of its body (a finished
    message has none any more).  A hundred heads at a time: at most 10 MiB read."""
    head = func.substr(bodies.c.body, 1, HEAD_BYTES, type_=LargeBinary)
    subjects = {}
    for start in range(0, len(ids), 100):
        query = select(bodies.c.message_id, head).where(
            bodies.c.message_id.in_(ids[start : start + 100])
        )
        for message_id, start_of_body in await conn.execute(query):
            subjects[message_id] = subject_of(bytes(start_of_body))
    return subjects


async def _views(
    conn: AsyncConnection, rows: Sequence[Row[Any]], terms: Sequence[Any] = ()
) -> list[MessageView]:
    """The messages of `rows` with their recipients (those that match `terms`)."""
    by_message: dict[str, list[RecipientView]] = {row.id: [] for row in rows}
    ids = list(by_message)
    # Mail never tried because its primary is down says why it waits: the domain's reason.
    down = select(domains.c.name, domains.c.reason).where(domains.c.state == PrimaryState.DOWN)
    waiting = {name: reason for name, reason in await conn.execute(down)}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        result = await conn.execute(
            select(recipients)
            .where(recipients.c.message_id.in_(chunk), *terms)
            .order_by(recipients.c.id)
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
