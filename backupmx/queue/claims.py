"""Claims and leases: which recipients are due, and who is sending them.

Promises:

* `claim` hands each due recipient to one claimant at a time, under a lease:
  SQLite by ``UPDATE … RETURNING`` inside ``BEGIN IMMEDIATE``; PostgreSQL by
  ``FOR UPDATE SKIP LOCKED`` in a MATERIALIZED CTE (a plain ``IN (SELECT … LIMIT n
  FOR UPDATE SKIP LOCKED)`` can claim more than n rows), so several nodes can share
  one queue.  Only ``sending`` rows carry a lease.
* A lease lasts as long as its owner's heartbeat (`backupmx.queue.nodes`): a
  node that dies leaves ``sending`` rows that a live node gives back to the
  queue once the dead node's heartbeat is older than the lease, and a node
  gives back its own when it stops and when it starts again.  Each claim adds
  one to ``attempts``, which tells this claim's result from a late result of an
  earlier one (`backupmx.queue.results`).
* A node does not claim the mail of a domain whose primary it cannot reach
  itself (its ``primary_views`` row says down), though another node can.
* Recipients of a domain whose primary is down are not claimed, and not touched
  either: the claim skips the domain (see `Claims.claim`).  `make_due` brings
  mail deferred by backoff forward (a primary that came back, an operator's
  flush, an ETRN), in one statement.
* `claim` and `outbound` (the bodies of what was claimed) run in the deliveries'
  writer thread, in turn with the results (`backupmx.queue.writer.DeliveryWrites`):
  on SQLite a claim never sleeps on the lock of a result batch, nor a batch on a
  claim's.

Every state change here is a transition of `backupmx.queue.state`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import case, select, union_all, update
from sqlalchemy.engine import Connection

from backupmx.queue.domains import a_recipient_of_the_row
from backupmx.queue.models import bodies, domains, messages, primary_views, recipients
from backupmx.queue.records import Claim, Outbound, utcnow
from backupmx.queue.state import (
    Event,
    PrimaryEvent,
    PrimaryState,
    State,
    primary_sources,
    primary_target,
    sources,
    target,
)
from backupmx.queue.writer import DeliveryWrites

OUTBOUND_COLUMNS = [
    messages.c.id, messages.c.sender, bodies.c.body, messages.c.size, messages.c.body_type,
    messages.c.smtputf8, messages.c.dsn_ret, messages.c.dsn_envid, messages.c.received_at,
]  # fmt: skip
# A finished message has no body any more, and nothing left to send.
WITH_BODY = messages.join(bodies, bodies.c.message_id == messages.c.id)


# Bodies larger than this are not read with their claim, only when they are sent.
EAGER_BODY_BYTES = 256 * 1024


def outbound_record(row: Any) -> Outbound:
    """An `Outbound` from a row selected with `OUTBOUND_COLUMNS`."""
    return Outbound(
        row.id, row.sender, None if row.body is None else bytes(row.body), row.size,
        row.body_type, row.smtputf8, row.dsn_ret, row.dsn_envid, row.received_at,
    )  # fmt: skip


class Claims(DeliveryWrites):
    async def claim(self, owner: str, limit: int, now: datetime | None = None) -> list[Claim]:
        """Lease up to `limit` due recipients, oldest due first.

        Recipients of a domain whose primary is known to be down are left alone: the
        probes decide when it is worth trying again (`make_due` then), so a backup
        holding mail for a dead primary does not knock on its door with every message.

        Theory of operation.  First the domains that are not down and have a
        recipient due: one statement of fixed text, one ``LIMIT 1`` seek along
        ``ix_recipients_due`` (state, domain, next_attempt_at) per domain row.  Then
        those domains' oldest due recipients, in one UNION ALL of `limit`-row arms
        merged by due time.  A million recipients held for a down domain are never
        read; an idle poll is the first statement alone, whatever is held and however
        many domains have rows (an arm per open domain made every poll compile and
        run a statement with as many arms: 0.4 ms of CPU per domain row).  One
        ``domain IN (…) ORDER BY next_attempt_at`` would sort every due row of every
        open domain on each claim, a million during a flush.
        """
        at = now or utcnow()
        return await self._in_turn(lambda conn: self._claim_now(conn, owner, limit, at), first=True)

    def _claim_now(self, conn: Connection, owner: str, limit: int, now: datetime) -> list[Claim]:
        due_here = a_recipient_of_the_row(sources(Event.CLAIM), recipients.c.next_attempt_at <= now)
        unreachable_here = (
            select(primary_views.c.node)
            .where(
                primary_views.c.domain == domains.c.name,
                primary_views.c.node == owner,
                primary_views.c.state == PrimaryState.DOWN,
            )
            .exists()
        )
        open_and_due = select(domains.c.name).where(
            domains.c.state != PrimaryState.DOWN, ~unreachable_here, due_here.is_not(None)
        )
        names = list(conn.execute(open_and_due).scalars())
        if not names:
            return []
        # Nodes claiming at the same moment pick from the same oldest rows: each skips
        # what another has locked, so each needs candidates beyond its own limit.
        shared = self.dialect == "postgresql"
        candidates = _due(conn, names, limit * (CONCURRENT_CLAIMS if shared else 1), now)
        if not candidates:
            return []
        due = (
            select(recipients.c.id)
            .where(
                recipients.c.id.in_(candidates),
                recipients.c.state.in_(sources(Event.CLAIM)),
            )
            .order_by(recipients.c.next_attempt_at)
            .limit(limit)
        )
        values = {
            "state": target(Event.CLAIM),
            "lease_owner": owner,
            "attempts": recipients.c.attempts + 1,
            "updated_at": now,
        }
        returning = (
            recipients.c.id,
            recipients.c.message_id,
            recipients.c.address,
            recipients.c.domain,
            recipients.c.attempts,
            recipients.c.dsn_notify,
            recipients.c.dsn_orcpt,
        )
        if self.dialect == "postgresql":
            # Another node may be claiming the same candidates: SKIP LOCKED leaves
            # it those, in a MATERIALIZED CTE (a plain ``IN (SELECT … LIMIT n FOR
            # UPDATE SKIP LOCKED)`` can claim more than n rows).
            chosen = due.with_for_update(skip_locked=True).cte("due").prefix_with("MATERIALIZED")
            statement = (
                update(recipients)
                .where(recipients.c.id == chosen.c.id)
                .values(values)
                .returning(*returning)
            )
        else:
            statement = (
                update(recipients)
                .where(recipients.c.id.in_(due))
                .values(values)
                .returning(*returning)
            )
        rows = conn.execute(statement).all()
        return sorted((Claim(*row) for row in rows), key=lambda c: c.recipient_id)

    async def outbound(self, ids: Iterable[str]) -> dict[str, Outbound]:
        """The claimed messages by id, each body up to `EAGER_BODY_BYTES` with it; a larger
        one is left out (None) and read (`Inventory.body`) just before it is sent.  A claim of a
        hundred recipients of 50 MiB messages read 5 GB into serve at once: a flush of
        large mail could not fit in a small machine's memory."""
        eager = case((messages.c.size <= EAGER_BODY_BYTES, bodies.c.body), else_=None)
        columns = [eager.label("body") if c is bodies.c.body else c for c in OUTBOUND_COLUMNS]
        query = select(*columns).select_from(WITH_BODY).where(messages.c.id.in_(list(ids)))
        return await self._in_turn(
            lambda conn: {row.id: outbound_record(row) for row in conn.execute(query)}, first=True
        )

    async def make_due(
        self,
        *,
        domain: str | None = None,
        ids: Sequence[str] | None = None,
        recipient_ids: Sequence[int] | None = None,
        retry_down: bool = False,
        now: datetime | None = None,
    ) -> int:
        """Queued recipients (of a domain, of some messages, some recipients, or all)
        become due now: a flush, a requeue, an ETRN, or a primary that came back.
        With `retry_down` (an operator's flush), domains marked down are tried again
        too (RETRY), in the shared state and in every node's own view."""
        now = now or utcnow()
        if retry_down:
            async with self.engine.begin() as conn:
                await conn.execute(
                    update(domains)
                    .where(
                        domains.c.state.in_(primary_sources(PrimaryEvent.RETRY)),
                        *([domains.c.name == domain] if domain else []),
                    )
                    .values(state=primary_target(PrimaryEvent.RETRY), since=now, updated_at=now)
                )
                # Every node's own view too, or a node that saw it down would not claim.
                await conn.execute(
                    update(primary_views)
                    .where(
                        primary_views.c.state.in_(primary_sources(PrimaryEvent.RETRY)),
                        *([primary_views.c.domain == domain] if domain else []),
                    )
                    .values(state=primary_target(PrimaryEvent.RETRY), since=now, updated_at=now)
                )
        condition = [recipients.c.state == State.QUEUED.value, recipients.c.next_attempt_at > now]
        if domain is not None:
            condition.append(recipients.c.domain == domain)
        if ids is not None:
            async with self.engine.connect() as conn:
                await self._require(conn, ids)
            condition.append(recipients.c.message_id.in_(ids))
        if recipient_ids is not None:
            condition.append(recipients.c.id.in_(recipient_ids))
        async with self.engine.begin() as conn:
            outcome = await conn.execute(
                update(recipients).where(*condition).values(next_attempt_at=now, updated_at=now)
            )
        return outcome.rowcount


# SQLite's limit on the arms of one compound SELECT is 500.
_ARMS = 200
# Claims of several nodes at the same moment that each still find unlocked rows on
# PostgreSQL: a claim picks from this many times its limit of the oldest due rows.
CONCURRENT_CLAIMS = 4


def _due(conn: Connection, names: Sequence[str], limit: int, now: datetime) -> list[int]:
    """The ids of the `limit` recipients due longest among the domains `names`."""
    found: list[tuple[datetime, int]] = []
    for start in range(0, len(names), _ARMS):
        arms = [
            select(recipients.c.id, recipients.c.next_attempt_at)
            .where(
                recipients.c.state.in_(sources(Event.CLAIM)),
                recipients.c.domain == name,
                recipients.c.next_attempt_at <= now,
            )
            .order_by(recipients.c.next_attempt_at)
            .limit(limit)
            .subquery()
            for name in names[start : start + _ARMS]
        ]
        query = union_all(*(select(arm.c.id, arm.c.next_attempt_at) for arm in arms))
        found.extend((due, id_) for id_, due in conn.execute(query))
    return [id_ for _, id_ in sorted(found)[:limit]]
