"""The node registry: which ``serve`` processes share this queue, and whose leases end.

Promises:

* A node's lease on its ``sending`` recipients lasts as long as its heartbeat:
  `heartbeat` rewrites the node's row (``last_seen``) and thereby renews every
  lease it holds at once, in one small write, however much it is sending.
* A node whose ``last_seen`` is older than the lease is dead.  After each
  heartbeat a live node gives a dead node's ``sending`` recipients back to the queue
  (``lease_expired``: queued, due at once), and reports how many per dead node,
  so a killed node's work is taken over within one lease and one heartbeat, not
  after a housekeeping run.  A ``sending`` row whose owner has no row at all (a
  node pruned, or a lease from before the registry) is a dead node's too.
* Times of the heartbeat and of the death test are the database's clock on
  PostgreSQL (``now()``), so nodes whose clocks disagree still agree on who is
  dead; SQLite has one node and its clock.
* A node that stops cleanly gives back its leases and marks its row stopped; it
  then counts for nothing (not for the pacing shares either).  Rows of nodes
  unseen for `FORGET_AFTER` go.

What a node does with the answer (fencing its sends, its share of the primary's
connections) is the deliverer's (`backupmx.deliver.membership`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection

from backupmx.queue.database import QueueDatabase
from backupmx.queue.models import nodes, primary_views, recipients
from backupmx.queue.records import NodeState, node_state, utcnow
from backupmx.queue.state import Event, State, sources, target

# A dead node's row is kept this long after its last heartbeat, for `backupmx nodes`.
FORGET_AFTER = timedelta(days=1)
# How long a take-over waits for a dead node's locks before it tries again at the next
# heartbeat (a node stopped inside a transaction holds them until PostgreSQL ends its
# session: `backupmx.queue.database.IDLE_IN_TRANSACTION_MS`).
TAKE_OVER_LOCK_WAIT_MS = 1000


@dataclass(frozen=True)
class NodeReport:
    """What a node says of itself in each heartbeat."""

    name: str
    hostname: str
    version: str
    listen: str
    pid: int
    in_flight: int = 0
    delivered: int = 0
    delivery_rate: float = 0.0


class Nodes(QueueDatabase):
    async def register(self, report: NodeReport) -> None:
        """This node starts: its row, fresh (a restart under the same name replaces it)."""
        async with self.engine.begin() as conn:
            now = await self.database_now(conn)
            await conn.execute(delete(nodes).where(nodes.c.name == report.name))
            await conn.execute(
                insert(nodes).values(**_row(report), started_at=now, last_seen=now, stopped_at=None)
            )

    async def heartbeat(self, report: NodeReport, lease: timedelta) -> tuple[str, ...]:
        """Renew this node's leases (its row); return the live nodes, this one included.
        Nothing here waits for another node's locks."""
        async with self.engine.begin() as conn:
            now = await self.database_now(conn)
            renewed = await conn.execute(
                update(nodes)
                .where(nodes.c.name == report.name)
                .values(**_row(report), last_seen=now, stopped_at=None)
            )
            if not renewed.rowcount:  # pruned while this node could not write (a day)
                await conn.execute(
                    insert(nodes).values(**_row(report), started_at=now, last_seen=now)
                )
            live = await _live(conn, now, lease)
            await conn.execute(delete(nodes).where(nodes.c.last_seen < now - FORGET_AFTER))
            await conn.execute(
                delete(primary_views).where(primary_views.c.node.not_in(select(nodes.c.name)))
            )
        return live

    async def take_over(self, me: str, live: Sequence[str], lease: timedelta) -> dict[str, int]:
        """Give back the leases of every node holding ``sending`` recipients that is not
        live (nor `me`); return the count per dead node.  A dead node whose locks are
        still held (stopped in a transaction) is left for the next heartbeat."""
        taken_over: dict[str, int] = {}
        for owner in await self._owners_sending():
            if owner in live or owner == me:
                continue
            try:
                taken_over[owner] = await self._take_over(owner, lease)
            except OperationalError as error:
                if not _lock_not_available(error):
                    raise
        return {o: n for o, n in taken_over.items() if n}

    async def live_nodes(self, lease: timedelta) -> tuple[str, ...]:
        async with self.engine.connect() as conn:
            return await _live(conn, await self.database_now(conn), lease)

    async def stopped(self, name: str) -> None:
        """A clean stop: the row stays, for `backupmx nodes`, but counts no more."""
        async with self.engine.begin() as conn:
            now = await self.database_now(conn)
            await conn.execute(
                update(nodes).where(nodes.c.name == name).values(stopped_at=now, in_flight=0)
            )

    async def _owners_sending(self) -> list[str]:
        """The nodes holding ``sending`` recipients: one walk of ``ix_recipients_owner``."""
        query = (
            select(recipients.c.lease_owner)
            .where(recipients.c.state == State.SENDING.value)
            .group_by(recipients.c.lease_owner)
        )
        async with self.engine.connect() as conn:
            return [o for o in (await conn.execute(query)).scalars() if o is not None]

    async def give_back_leases(self, owner: str) -> int:
        """Every recipient this node (`owner`) is sending goes back to the queue, due as
        it was (so at once: it was due when claimed): at a clean stop, at start-up, and
        after its fence fell (`backupmx.deliver.membership`)."""
        async with self.engine.begin() as conn:
            return await _give_back(conn, owner)

    async def _take_over(self, owner: str, lease: timedelta) -> int:
        """A dead node's recipients go back to the queue, if it is still dead once its
        row is locked: a node that wrote a heartbeat since this one read the live nodes
        keeps its work (its heartbeat waits for this transaction, or this one sees it)."""
        async with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                await conn.execute(text(f"SET LOCAL lock_timeout = {TAKE_OVER_LOCK_WAIT_MS}"))
            now = await self.database_now(conn)
            row = (
                await conn.execute(
                    select(nodes.c.last_seen, nodes.c.stopped_at)
                    .where(nodes.c.name == owner)
                    .with_for_update()
                )
            ).first()
            if row is not None and _state(row, now, lease) is NodeState.LIVE:
                return 0
            return await _give_back(conn, owner)


async def _live(conn: AsyncConnection, now: datetime, lease: timedelta) -> tuple[str, ...]:
    """The live nodes' names, by `node_state` (the one rule, which ``backupmx nodes``
    shows too); the table holds a row per node, so it is read whole."""
    rows = await conn.execute(
        select(nodes.c.name, nodes.c.last_seen, nodes.c.stopped_at).order_by(nodes.c.name)
    )
    return tuple(row.name for row in rows if _state(row, now, lease) is NodeState.LIVE)


def _state(row: Any, now: datetime, lease: timedelta) -> NodeState:
    return node_state((now - row.last_seen).total_seconds(), row.stopped_at, lease.total_seconds())


async def _give_back(conn: AsyncConnection, owner: str) -> int:
    event = Event.LEASE_EXPIRED
    outcome = await conn.execute(
        update(recipients)
        .where(recipients.c.state.in_(sources(event)), recipients.c.lease_owner == owner)
        .values(state=target(event), updated_at=utcnow(), lease_owner=None)
    )
    return outcome.rowcount


def _lock_not_available(error: OperationalError) -> bool:
    return getattr(error.orig, "sqlstate", None) == "55P03"  # lock_not_available


def _row(report: NodeReport) -> dict[str, object]:
    return {
        "name": report.name,
        "hostname": report.hostname,
        "version": report.version,
        "listen": report.listen,
        "pid": report.pid,
        "in_flight": report.in_flight,
        "delivered": report.delivered,
        "delivery_rate": report.delivery_rate,
    }
