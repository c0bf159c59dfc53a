"""The domains table: what the deliverer knows of each destination, for every node.

The deliverer (`backupmx.deliver.primaries`) decides a domain's primary state
(by the table `PRIMARY_TRANSITIONS` of `backupmx.queue.state`); this file only
keeps it, with the route in use, why mail waits, and the last probe, so that
``backupmx domains``, ``status``, the metrics and every node sharing the queue
see the same.  A domain's row is created by its first report, in state
``unknown``, by the inserter when the domain's first mail is queued
(`backupmx.queue.inserter`) or by its first report.  `claim`
(`backupmx.queue.claims`) reads the state to leave a dead primary's mail alone.

The rows of other destinations (the senders' domains our DSNs go to) go again
once nothing waits for them (`forget_quiet_domains`): every claim reads each row
that is not down, so their number must follow what is pending, not every domain
ever written to.

A domain held because its own MX lookup fails (NXDOMAIN, SERVFAIL, timeout) has
a ``reason`` that starts with `DNS_FAILURE` (written by `backupmx.deliver.route`);
`dns_failing` is how ``domains --json``, ``status`` and the metric
``backupmx_domain_dns_failing`` tell it apart from a primary that does not answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ScalarSelect, delete, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from backupmx.queue.database import QueueDatabase
from backupmx.queue.models import domains, primary_views, recipients
from backupmx.queue.records import DomainState, utcnow
from backupmx.queue.state import PENDING, PrimaryState, State

# The start of the reason of a domain whose MX lookup fails: "DNS: MX lookup of …".
DNS_FAILURE = "DNS: "
QUIET_AFTER = timedelta(minutes=10)  # a row left unchanged this long, with nothing pending
DOMAINS_PER_DELETE = 500


class Domains(QueueDatabase):
    async def set_domain_state(
        self,
        name: str,
        state: PrimaryState | None = None,
        *,
        node: str | None = None,
        others: Sequence[str] = (),
        route: str | None = None,
        reason: str | None = None,
        probe_result: str | None = None,
        now: datetime | None = None,
    ) -> bool:
        """Record what we know of a domain; return True if its shared state changed.

        With `node`, `state` is first that node's own view (``primary_views``).  The
        shared state is up while any live node reaches the primary: a node that finds
        it down leaves it up if one of the `others` (the other live nodes) last saw it
        up, and keeps its own view, which stops it claiming the domain's mail
        (`backupmx.queue.claims`).  So one node whose network is broken neither flips
        the state nor holds the mail back, and the state goes down only when every
        live node that tried has failed."""
        now = now or utcnow()
        async with self.engine.begin() as conn:
            if state is not None and node is not None:
                await _set_view(conn, name, node, state, reason, now)
                if state is PrimaryState.DOWN and others and await _reached_by(conn, name, others):
                    state, reason = PrimaryState.UP, None
            row = (await conn.execute(select(domains).where(domains.c.name == name))).first()
            values: dict[str, Any] = {"updated_at": now}
            if route is not None:
                values["route"] = route
            if reason is not None:
                values["reason"] = reason or None
            if probe_result is not None:
                values["last_probe_at"], values["last_probe_result"] = now, probe_result
            changed = state is not None and (row is None or row.state != state)
            if changed:
                values["state"], values["since"] = state, now
            if row is None:
                values.setdefault("state", PrimaryState.UNKNOWN)
                values.setdefault("since", now)
                await conn.execute(insert(domains).values(name=name, **values))
            else:
                await conn.execute(update(domains).where(domains.c.name == name).values(values))
        return changed

    async def primary_views(self, live: Sequence[str]) -> dict[str, dict[str, PrimaryState]]:
        """Each domain's primary as each of the `live` nodes last saw it."""
        query = select(primary_views).where(primary_views.c.node.in_(list(live)))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        views: dict[str, dict[str, PrimaryState]] = {}
        for row in rows:
            views.setdefault(row.domain, {})[row.node] = PrimaryState(row.state)
        return views

    async def domain_states(self) -> dict[str, DomainState]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(domains))).all()
        return {
            r.name: DomainState(
                r.name,
                PrimaryState(r.state),
                r.since,
                r.route,
                r.reason,
                r.last_probe_at,
                r.last_probe_result,
            )
            for r in rows
        }

    async def pending_domains(self) -> list[str]:
        """Domains with recipients waiting for delivery (queued or being sent): the
        ones the probes watch.  Every domain with pending mail has a row (the
        inserter makes it), so this is one index seek per domain, not a scan of
        what is held."""
        pending = a_recipient_of_the_row([State.QUEUED, State.SENDING])
        query = select(domains.c.name).where(pending.is_not(None)).order_by(domains.c.name)
        async with self.engine.connect() as conn:
            return list((await conn.execute(query)).scalars())

    async def forget_quiet_domains(
        self, keep: Callable[[str], bool], now: datetime | None = None
    ) -> int:
        """Delete the rows of domains with no pending recipient (queued, sending or
        held) and unchanged for `QUIET_AFTER`, except those `keep` names (the
        backed-up domains, whose primary state the operator watches).  Returns the
        number deleted.

        The inserter adds a row in the transaction that queues a domain's first
        mail, so a delete must not decide on a snapshot older than that commit.
        On PostgreSQL the table lock (SHARE ROW EXCLUSIVE conflicts with the
        inserter's ROW EXCLUSIVE) waits for inserters in progress and holds new
        ones for the length of one small delete, whose NOT-pending test then sees
        their recipients; SQLite's writers are serialized by ``BEGIN IMMEDIATE``.
        """
        before = (now or utcnow()) - QUIET_AFTER
        quiet = a_recipient_of_the_row(PENDING).is_(None)
        query = select(domains.c.name).where(domains.c.updated_at < before, quiet)
        async with self.engine.connect() as conn:
            names = [n for n in (await conn.execute(query)).scalars() if not keep(n)]
        forgotten = 0
        for start in range(0, len(names), DOMAINS_PER_DELETE):
            batch = names[start : start + DOMAINS_PER_DELETE]
            async with self.engine.begin() as conn:
                if self.dialect == "postgresql":
                    await conn.execute(text("LOCK TABLE domains IN SHARE ROW EXCLUSIVE MODE"))
                result = await conn.execute(delete(domains).where(domains.c.name.in_(batch), quiet))
                forgotten += result.rowcount
                await conn.execute(
                    delete(primary_views).where(
                        primary_views.c.domain.in_(batch),
                        primary_views.c.domain.not_in(select(domains.c.name)),
                    )
                )
        return forgotten


def dns_failing(state: DomainState) -> bool:
    """True while the domain is down because its own MX lookup fails (not its primary)."""
    return state.state == PrimaryState.DOWN and (state.reason or "").startswith(DNS_FAILURE)


async def _set_view(
    conn: AsyncConnection,
    domain: str,
    node: str,
    state: PrimaryState,
    reason: str | None,
    now: datetime,
) -> None:
    """This node's own view of the domain's primary (only this node writes its rows)."""
    key = (primary_views.c.domain == domain, primary_views.c.node == node)
    before = (await conn.execute(select(primary_views.c.state).where(*key))).scalar()
    values: dict[str, Any] = {"state": state, "reason": reason or None, "updated_at": now}
    if before != state:
        values["since"] = now
    if before is None:
        await conn.execute(insert(primary_views).values(domain=domain, node=node, **values))
    else:
        await conn.execute(update(primary_views).where(*key).values(values))


async def _reached_by(conn: AsyncConnection, domain: str, nodes: Sequence[str]) -> bool:
    """Whether one of `nodes` last saw the domain's primary up."""
    query = select(primary_views.c.node).where(
        primary_views.c.domain == domain,
        primary_views.c.node.in_(list(nodes)),
        primary_views.c.state == PrimaryState.UP,
    )
    return (await conn.execute(query.limit(1))).first() is not None


def a_recipient_of_the_row(states: Iterable[str], *conditions: Any) -> ScalarSelect[Any]:
    """For a query over ``domains``: the id of one recipient of the row's domain in one
    of `states` (and meeting `conditions`), or NULL.  A correlated LIMIT 1 is one seek
    along ``ix_recipients_due`` (state, domain, next_attempt_at) per row, whatever is
    held; not EXISTS, which PostgreSQL may turn into a hash join over every pending row."""
    return (
        select(recipients.c.id)
        .where(
            recipients.c.state.in_([str(state) for state in states]),
            recipients.c.domain == domains.c.name,
            *conditions,
        )
        .limit(1)
        .scalar_subquery()
    )
