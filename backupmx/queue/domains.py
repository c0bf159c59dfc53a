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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ScalarSelect, delete, insert, select, text, update

from backupmx.queue.database import QueueDatabase
from backupmx.queue.models import domains, recipients
from backupmx.queue.records import DomainState, utcnow
from backupmx.queue.state import PENDING, PrimaryState, State

QUIET_AFTER = timedelta(minutes=10)  # a row left unchanged this long, with nothing pending
DOMAINS_PER_DELETE = 500


class Domains(QueueDatabase):
    async def set_domain_state(
        self,
        name: str,
        state: PrimaryState | None = None,
        *,
        route: str | None = None,
        reason: str | None = None,
        probe_result: str | None = None,
        now: datetime | None = None,
    ) -> bool:
        """Record what we know of a domain; return True if its state changed."""
        now = now or utcnow()
        async with self.engine.begin() as conn:
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
        return forgotten


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
