"""Results and sweeps: how recipients leave ``sending``, and how overdue ones leave the queue.

Promises:

* `record` applies delivery results only to recipients the reporting node still
  holds under the same claim (``attempts``): a lease that was given back while
  the node could not renew it, and perhaps claimed again since, is someone
  else's.  Such a result is logged (``result_after_lease_lost``, with the
  recipient and who holds it now) and dropped, with the DSNs of its message's
  results: the node that holds the recipient now writes its own.  The DSNs for
  the results applied are queued in the same transaction, so a recipient is
  never bounced without its DSN (docs/queue.md, invariant 2).
* `sweep` expires or bounces pending recipients, or marks them delay-warned,
  together with their DSNs in one transaction (invariant 2 again).
* Both finish the messages whose last recipient they made final, in the same
  transaction (`backupmx.queue.retention.finish`: the body goes).
* `record` writes each applied result's attempt (host, reply) to the recipient's
  history in the same transaction (`backupmx.queue.attempts`); a dropped result
  writes none.

Theory of operation.  Results of concurrent deliveries share a transaction
(group commit, `backupmx.queue.writer`, as received mail does in the intake
process), written in the deliveries' writer thread through a plain (not
asyncio) engine, in turn with the claims (`DeliveryWrites`), so a flush of
thousands of messages pays one fsync per batch, not per message, and no
batch waits on a claim's lock.  A failed batch fails every `record` call in
it; nothing is retried here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import bindparam, false, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from backupmx.queue import attempts
from backupmx.queue.claims import OUTBOUND_COLUMNS, outbound_record
from backupmx.queue.inserter import Inserter
from backupmx.queue.models import bodies, messages, recipients
from backupmx.queue.records import NewMessage, Overdue, Result, utcnow
from backupmx.queue.retention import finish
from backupmx.queue.state import FINAL, Event, State, sources, target
from backupmx.queue.writer import DeliveryWrites, GroupCommitWriter

log = structlog.get_logger("backupmx.queue")


@dataclass
class _Report:
    """One `Results.record` call on its way through the results writer."""

    owner: str
    results: Sequence[Result]
    notices: Sequence[NewMessage]
    changed: int = 0
    held: bool = True  # every result's recipient is still the owner's, under that claim

    @property
    def size(self) -> int:
        return sum(n.size for n in self.notices) + 1


def _result_statement(event: Event) -> Any:
    values: dict[str, Any] = {
        "state": target(event),
        "last_error": bindparam("error"),
        "lease_owner": None,
        "lease_until": None,
        "updated_at": bindparam("now"),
    }
    if event is Event.TEMPFAIL:
        values["next_attempt_at"] = bindparam("next_attempt_at")
    return (
        update(recipients)
        .where(
            recipients.c.id == bindparam("recipient_id"),
            recipients.c.lease_owner == bindparam("owner"),
            # Not IN (…): SQLAlchemy cannot expand IN lists inside executemany.
            or_(*(recipients.c.state == state for state in sources(event))),
        )
        .values(values)
    )


_FINISH_CHUNK = 500  # recipient ids per `finish` statement

_RESULT_STATEMENTS = {
    event: _result_statement(event)
    for event in (Event.SUCCESS, Event.TEMPFAIL, Event.PERMFAIL, Event.QUARANTINE)
}


def _fence(conn: Connection, batch: Sequence[_Report]) -> dict[int, str]:
    """Keep, in each report, only the results whose recipient its owner still holds under
    the claim the result is for; log the others; return the kept recipients' message ids.
    The rows are locked (PostgreSQL) until the results are written, so no node gives
    them back in between."""
    ids = sorted(r.recipient_id for report in batch for r in report.results)
    rows: dict[int, Any] = {}
    for start in range(0, len(ids), _FINISH_CHUNK):
        query = (
            select(
                recipients.c.id, recipients.c.state, recipients.c.lease_owner,
                recipients.c.attempts, recipients.c.address, recipients.c.message_id,
            )
            .where(recipients.c.id.in_(ids[start : start + _FINISH_CHUNK]))
            .order_by(recipients.c.id)  # locks taken in id order, as `queue hold` takes them
            .with_for_update()
        )  # fmt: skip
        rows.update((row.id, row) for row in conn.execute(query))
    taken: dict[int, str] = {}  # a recipient leaves `sending` with the first result applied
    for report in batch:
        kept = []
        for result in report.results:
            row = rows.get(result.recipient_id)
            if (
                row is not None
                and row.state == State.SENDING.value
                and row.lease_owner == report.owner
                and result.claim_attempts in (None, row.attempts)
                and result.recipient_id not in taken
            ):
                taken[result.recipient_id] = row.message_id
                kept.append(replace(result, claim_attempts=row.attempts))  # the attempt's number
                continue
            log.warning(
                "result_after_lease_lost",
                queue_id=row.message_id if row is not None else None,
                recipient=row.address if row is not None else result.recipient_id,
                result=result.event.value,
                owner=row.lease_owner if row is not None else None,
                state=row.state if row is not None else "deleted",
            )
        report.held = len(kept) == len(report.results)
        report.results = kept
    return taken


def _result_params(batch: Sequence[_Report], now: datetime) -> dict[Event, list[dict[str, Any]]]:
    by_event: dict[Event, list[dict[str, Any]]] = {}
    for report in batch:
        for result in report.results:
            params = {
                "recipient_id": result.recipient_id,
                "owner": report.owner,
                "error": result.error,
                "now": now,
            }
            if result.event is Event.TEMPFAIL:
                params["next_attempt_at"] = result.next_attempt_at or now
            by_event.setdefault(result.event, []).append(params)
    return by_event


class Results(DeliveryWrites):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._recorder: GroupCommitWriter[_Report] = GroupCommitWriter(self._record_batch)
        self._inserter: Inserter | None = None  # for the writer's dialect, once known

    def _start_recorder(self) -> None:
        self._start_writes()
        self._recorder.start()

    async def _stop_recorder(self) -> None:
        await self._recorder.stop()
        self._stop_writes()

    async def record(
        self, owner: str, results: Sequence[Result], notices: Sequence[NewMessage] = ()
    ) -> int:
        """Apply delivery results to recipients this owner still holds; return rows changed.
        `notices` (DSNs for these results) are queued in the same transaction."""
        report = _Report(owner, results, notices)
        await self._recorder.submit(report)
        return report.changed

    async def _record_batch(self, batch: Sequence[_Report]) -> None:
        await self._in_turn(lambda conn: self._record_now(conn, batch))

    def _record_now(self, conn: Connection, batch: Sequence[_Report]) -> None:
        """In the writer thread: every report of the batch in one transaction, one
        statement per kind of result (executemany), not one per message: a flush's
        batches of a hundred results cost half the writer's time the other way."""
        now = utcnow()
        message_of = _fence(conn, batch)
        notices = [n for report in batch if report.held for n in report.notices]
        if notices:
            self._inserter = self._inserter or Inserter(conn.dialect)
            self._inserter.insert(conn, notices, now)
        for event, params in _result_params(batch, now).items():
            conn.execute(_RESULT_STATEMENTS[event], params)
        for report in batch:
            # The fence kept only rows in `sending` under this owner, locked (or, on
            # SQLite, under the one write lock) until the commit: each was changed.
            report.changed = len(report.results)
        attempts.write(conn, [r for report in batch for r in report.results], now)
        finished = sorted(
            {
                message_of[result.recipient_id]
                for report in batch
                if report.held
                for result in report.results
                if target(result.event) in FINAL
            }
        )
        for start in range(0, len(finished), _FINISH_CHUNK):
            for statement in finish(finished[start : start + _FINISH_CHUNK], now):
                conn.execute(statement)

    async def sweep(
        self,
        event: Event | None,
        notices_for: Callable[[list[Overdue]], list[NewMessage]],
        *,
        older_than: datetime | None = None,
        recipient_ids: Sequence[int] | None = None,
        limit: int = 500,
        now: datetime | None = None,
    ) -> int:
        """Pending recipients of messages received before `older_than` (or of the
        recipients `recipient_ids`): apply `event` (EXPIRE, BOUNCE), or with None mark them
        delay-warned; queue their DSNs in the same transaction (invariant 2)."""
        now = now or utcnow()
        states = sources(event) if event else [State.QUEUED.value, State.HELD.value]
        # The oldest candidate messages first, along a partial index of pending messages
        # (ix_messages_pending; for warnings ix_messages_unwarned): finished records and
        # messages already warned are never read again.
        candidates = (
            select(messages.c.id, messages.c.received_at)
            .where(messages.c.finished_at.is_(None))
            .order_by(messages.c.received_at)
            .limit(limit)
        )
        if event is None:
            candidates = candidates.where(messages.c.delay_warned == false())
        if older_than is not None:
            candidates = candidates.where(messages.c.received_at < older_than)
        if recipient_ids is not None:
            chosen_ids = select(recipients.c.message_id).where(recipients.c.id.in_(recipient_ids))
            candidates = candidates.where(messages.c.id.in_(chosen_ids))
        chosen = candidates.subquery("chosen")
        query = (
            select(
                recipients.c.id.label("recipient_id"), recipients.c.address,
                recipients.c.dsn_notify, recipients.c.dsn_orcpt, recipients.c.last_error,
                *OUTBOUND_COLUMNS,
            )
            .select_from(chosen)
            .join(recipients, recipients.c.message_id == chosen.c.id)
            .join(messages, messages.c.id == chosen.c.id)
            .join(bodies, bodies.c.message_id == chosen.c.id)
            # state || '': no index on state for this filter, so that the planner walks
            # the few chosen messages' recipients (ix_recipients_message) instead of
            # every recipient in these states.
            .where((recipients.c.state + "").in_(states))
            .order_by(chosen.c.received_at)
            .limit(limit)
        )  # fmt: skip
        if event is None:
            query = query.where(recipients.c.delay_warned == false())
        if recipient_ids is not None:
            query = query.where(recipients.c.id.in_(recipient_ids))
        async with self.engine.begin() as conn:
            rows = (await conn.execute(query)).all()
            if not rows:
                return 0
            overdue = [
                Overdue(
                    r.recipient_id, r.address, r.dsn_notify, r.dsn_orcpt, r.last_error,
                    outbound_record(r),
                )
                for r in rows
            ]  # fmt: skip
            values: dict[str, Any] = (
                {"state": target(event), "lease_owner": None, "lease_until": None}
                if event
                else {"delay_warned": True}
            )
            await conn.execute(
                update(recipients)
                .where(
                    recipients.c.id.in_([o.recipient_id for o in overdue]),
                    recipients.c.state.in_(states),
                )
                .values(updated_at=now, **values)
            )
            await _insert(conn, notices_for(overdue), now)
            swept = {o.message.id for o in overdue}
            if event is not None:  # expired and bounced are final
                for statement in finish(swept, now):
                    await conn.execute(statement)
            else:
                await conn.execute(_warned(swept))
        return len(overdue)


def _warned(message_ids: set[str]) -> Any:
    """Mark messages warned once none of their pending recipients waits for a warning."""
    waiting = select(recipients.c.id).where(
        recipients.c.message_id == messages.c.id,
        recipients.c.state.in_([State.QUEUED.value, State.HELD.value]),
        recipients.c.delay_warned == false(),
    )
    return (
        update(messages)
        .where(messages.c.id.in_(message_ids), ~waiting.exists())
        .values(delay_warned=True)
    )


async def _insert(conn: AsyncConnection, batch: Sequence[NewMessage], now: datetime) -> None:
    if batch:
        await conn.run_sync(lambda sync: Inserter(sync.dialect).insert(sync, batch, now))
