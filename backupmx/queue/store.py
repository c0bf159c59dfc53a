"""The queue store: the only way any stage reads or changes the queue.

Promises:

* `enqueue` returns only after the message and all its recipients are committed
  (by the intake process, `backupmx.queue.intake`, in group commits); on any
  storage error it raises and nothing of the message is visible.
* `claim` hands each due recipient to one claimant at a time, under a lease:
  SQLite by ``UPDATE … RETURNING`` inside ``BEGIN IMMEDIATE``; PostgreSQL by
  ``FOR UPDATE SKIP LOCKED`` in a MATERIALIZED CTE (a plain ``IN (SELECT … LIMIT n
  FOR UPDATE SKIP LOCKED)`` can claim more than n rows), so several nodes can share
  one queue.  A claimant that dies leaves `sending` rows whose lease runs out;
  `release_expired_leases` puts them back.
* Every state change is a transition of `backupmx.queue.state`.

Admin operations on unknown queue ids raise `UnknownMessage` naming them.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Table, bindparam, case, delete, false, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect, Engine, Row
from sqlalchemy.ext.asyncio import AsyncConnection

from backupmx.queue.database import open_engine, open_writer_engine
from backupmx.queue.intake import Intake
from backupmx.queue.models import domains, greylist, messages, recipient_verdicts, recipients
from backupmx.queue.state import PENDING, Event, State, sources, target
from backupmx.queue.writer import GroupCommitWriter


def new_queue_id() -> str:
    """20 hex digits: microseconds since the epoch, then 28 random bits (sorts by arrival)."""
    return f"{time.time_ns() // 1000:013X}{secrets.randbits(28):07X}"


def utcnow() -> datetime:
    return datetime.now(UTC)


def oldest_first(found: Iterable[MessageView]) -> list[MessageView]:
    return sorted(found, key=lambda m: (m.received_at, m.id))


class BodySource(Protocol):
    @property
    def size(self) -> int: ...

    def read(self) -> bytes: ...

    def portable(self) -> BodySource:
        """The same body in a form the intake process can read (picklable)."""
        ...


@dataclass(frozen=True)
class BytesBody:
    """A body already in memory (a DSN we generate)."""

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self) -> bytes:
        return self.data

    def portable(self) -> BytesBody:
        return self


@dataclass(frozen=True)
class OpenedFile:
    """A body in a file another process holds open, read through its /proc link."""

    path: str
    size: int

    def read(self) -> bytes:
        with open(self.path, "rb") as body:
            return body.read()

    def portable(self) -> OpenedFile:
        return self


@dataclass(frozen=True)
class NewRecipient:
    address: str
    domain: str
    notify: str | None = None
    orcpt: str | None = None


@dataclass
class NewMessage:
    id: str
    sender: str
    recipients: list[NewRecipient]
    body: BodySource
    client_ip: str
    client_helo: str
    protocol: str
    session_id: str
    tls: str | None = None
    body_type: str = "7BIT"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    received_at: datetime = field(default_factory=utcnow)
    spam_verdict: str | None = None  # the spam check's action, if one ran
    spam_score: float | None = None
    spam_detail: str | None = None

    @property
    def size(self) -> int:
        return self.body.size


@dataclass(frozen=True)
class RecipientView:
    id: int
    address: str
    domain: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    notify: str | None
    orcpt: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "domain": self.domain,
            "state": self.state,
            "attempts": self.attempts,
            "next_attempt_at": _iso(self.next_attempt_at),
            "last_error": self.last_error,
            "notify": self.notify,
            "orcpt": self.orcpt,
        }


@dataclass(frozen=True)
class MessageView:
    id: str
    sender: str
    size: int
    sha256: str
    received_at: datetime
    client_ip: str
    client_helo: str
    protocol: str
    tls: str | None
    body_type: str
    smtputf8: bool
    ret: str | None
    envid: str | None
    recipients: list[RecipientView]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sender": self.sender,
            "size": self.size,
            "sha256": self.sha256,
            "received_at": _iso(self.received_at),
            "client_ip": self.client_ip,
            "client_helo": self.client_helo,
            "protocol": self.protocol,
            "tls": self.tls,
            "body_type": self.body_type,
            "smtputf8": self.smtputf8,
            "ret": self.ret,
            "envid": self.envid,
            "recipients": [r.to_json() for r in self.recipients],
        }


@dataclass(frozen=True)
class Claim:
    recipient_id: int
    message_id: str
    address: str
    domain: str
    attempts: int
    notify: str | None
    orcpt: str | None


@dataclass(frozen=True)
class Outbound:
    """A queued message as the deliverer sends it."""

    id: str
    sender: str
    body: bytes
    size: int
    body_type: str
    smtputf8: bool
    ret: str | None
    envid: str | None
    received_at: datetime


@dataclass(frozen=True)
class Overdue:
    """A pending recipient past a deadline (expiry or delay warning), with its envelope."""

    recipient_id: int
    address: str
    notify: str | None
    orcpt: str | None
    last_error: str | None
    message: Outbound


@dataclass(frozen=True)
class DomainState:
    name: str
    state: str  # up, down, unknown
    since: datetime
    route: str | None
    reason: str | None
    last_probe_at: datetime | None
    last_probe_result: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.name,
            "state": self.state,
            "since": _iso(self.since),
            "route": self.route,
            "reason": self.reason,
            "last_probe_at": _iso(self.last_probe_at) if self.last_probe_at else None,
            "last_probe_result": self.last_probe_result,
        }


@dataclass(frozen=True)
class Result:
    recipient_id: int
    event: Event  # SUCCESS, TEMPFAIL or PERMFAIL
    error: str | None = None
    next_attempt_at: datetime | None = None  # for TEMPFAIL


@dataclass(frozen=True)
class DomainStats:
    domain: str
    counts: dict[str, int]
    oldest: datetime | None


def waiting(counts: dict[str, int]) -> int:
    """Recipients still to be sent (queued, or being sent now), from per-state counts."""
    return counts.get(State.QUEUED.value, 0) + counts.get(State.SENDING.value, 0)


@dataclass(frozen=True)
class Stats:
    messages: int  # messages with at least one pending recipient
    recipients: dict[str, int]  # per state, every state present
    oldest: datetime | None
    domains: list[DomainStats]

    def to_json(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "recipients": self.recipients,
            "oldest_received_at": _iso(self.oldest) if self.oldest else None,
            "domains": [
                {
                    "domain": d.domain,
                    "recipients": d.counts,
                    "oldest_received_at": _iso(d.oldest) if d.oldest else None,
                }
                for d in self.domains
            ],
        }


@dataclass(frozen=True)
class RecipientVerdict:
    """What the primary said of an address (the recipient-verification cache)."""

    address: str  # local part as sent, "@", the A-label domain
    valid: bool
    reply: str | None
    source: str  # "callout" or "delivery"
    checked_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class SpamRecord:
    verdict: str | None
    score: float | None
    detail: str | None

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "score": self.score, "detail": self.detail}


class UnknownMessage(LookupError):
    def __init__(self, ids: Iterable[str]) -> None:
        self.ids = sorted(ids)
        super().__init__(f"no such message: {', '.join(self.ids)}")


def _rows(
    batch: Sequence[NewMessage], now: datetime
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Insert rows for new messages and their recipients (all queued, due now)."""
    bodies = [m.body.read() for m in batch]
    message_rows = [
        {
            "id": m.id, "sender": m.sender, "body": body, "size": len(body),
            "sha256": hashlib.sha256(body).hexdigest(), "received_at": m.received_at,
            "client_ip": m.client_ip,
            "client_helo": m.client_helo, "protocol": m.protocol, "tls": m.tls,
            "body_type": m.body_type, "smtputf8": m.smtputf8, "dsn_ret": m.ret,
            "dsn_envid": m.envid, "session_id": m.session_id,
            "spam_verdict": m.spam_verdict, "spam_score": m.spam_score,
            "spam_detail": m.spam_detail,
        }
        for m, body in zip(batch, bodies, strict=True)
    ]  # fmt: skip
    recipient_rows = [
        {
            "message_id": m.id, "address": r.address, "domain": r.domain,
            "state": State.QUEUED.value, "attempts": 0, "next_attempt_at": now,
            "last_error": None, "lease_owner": None, "lease_until": None,
            "dsn_notify": r.notify, "dsn_orcpt": r.orcpt, "updated_at": now,
            "delay_warned": False,
        }
        for m in batch
        for r in m.recipients
    ]  # fmt: skip
    return message_rows, recipient_rows


class Inserter:
    """The inserts of new messages and recipients, compiled once for the writer's
    dialect and run with the driver's own executemany.  SQLAlchemy's per-execution
    machinery measured more CPU than SQLite's work itself."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._prepared: dict[str, tuple[str, list[str], list[Any]]] = {}

    def insert(self, conn: Connection, batch: Sequence[NewMessage], now: datetime) -> None:
        """New messages, all their recipients queued and due `now`, in `conn`'s transaction."""
        message_rows, recipient_rows = _rows(batch, now)
        cursor = conn.connection.cursor()
        try:
            for table, rows in ((messages, message_rows), (recipients, recipient_rows)):
                if rows:
                    cursor.executemany(*self._parameters(table, rows))
        finally:
            cursor.close()

    def _parameters(self, table: Table, rows: list[dict[str, Any]]) -> tuple[str, list[Any]]:
        prepared = self._prepared.get(table.name)
        if prepared is None:
            keys = list(rows[0])
            compiled = insert(table).compile(dialect=self._dialect, column_keys=keys)
            order = list(compiled.positiontup or []) if self._dialect.positional else keys
            processors = [table.c[key].type.bind_processor(self._dialect) for key in order]
            prepared = self._prepared[table.name] = (str(compiled), order, processors)
        sql, order, processors = prepared
        pairs = list(zip(order, processors, strict=True))
        values = [[p(row[k]) if p else row[k] for k, p in pairs] for row in rows]
        if self._dialect.positional:
            return sql, [tuple(v) for v in values]
        return sql, [dict(zip(order, v, strict=True)) for v in values]


@dataclass
class _Report:
    """One `Store.record` call on its way through the results writer."""

    owner: str
    results: Sequence[Result]
    notices: Sequence[NewMessage]
    changed: int = 0

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


_RESULT_STATEMENTS = {
    event: _result_statement(event)
    for event in (Event.SUCCESS, Event.TEMPFAIL, Event.PERMFAIL, Event.QUARANTINE)
}


def _result_params(report: _Report, now: datetime) -> dict[Event, list[dict[str, Any]]]:
    by_event: dict[Event, list[dict[str, Any]]] = {}
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


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


_MESSAGE_COLUMNS = [c for c in messages.c if c.name != "body"]
_OUTBOUND_COLUMNS = [
    messages.c.id, messages.c.sender, messages.c.body, messages.c.size, messages.c.body_type,
    messages.c.smtputf8, messages.c.dsn_ret, messages.c.dsn_envid, messages.c.received_at,
]  # fmt: skip


def _outbound(row: Any) -> Outbound:
    return Outbound(
        row.id, row.sender, bytes(row.body), row.size, row.body_type, row.smtputf8,
        row.dsn_ret, row.dsn_envid, row.received_at,
    )  # fmt: skip


_PENDING = sorted(PENDING)
# A passed greylist triplet's last_seen is rewritten at most this often, so that
# mail from a known sender does not cost a write per recipient.
GREYLIST_REFRESH = timedelta(minutes=10)


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = open_engine(url)
        self._intake = Intake(url)
        self._recorder: GroupCommitWriter[_Report] = GroupCommitWriter(self._record_batch)
        self._writer_engine: Engine | None = None
        self._inserter: Inserter | None = None
        self._writer_thread: ThreadPoolExecutor | None = None

    @classmethod
    def open(cls, url: str) -> Store:
        return cls(url)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    async def start(self) -> None:
        """Start the writers (serve only): the intake process for received mail, and the
        group-commit thread for delivery results."""
        self._writer_engine = open_writer_engine(self.url)
        self._inserter = Inserter(self._writer_engine.dialect)
        self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="queue-writer")
        self._recorder.start()
        await self._intake.start()

    async def close(self) -> None:
        await self._intake.close()
        await self._recorder.stop()
        if self._writer_thread is not None:
            self._writer_thread.shutdown(wait=True)
        if self._writer_engine is not None:
            self._writer_engine.dispose()
        await self.engine.dispose()

    # ------------------------------------------------------------------ receive

    async def enqueue(self, message: NewMessage) -> None:
        await self._intake.commit(replace(message, body=message.body.portable()))

    # ------------------------------------------------------------------ deliver

    async def claim(
        self, owner: str, limit: int, lease: timedelta, now: datetime | None = None
    ) -> list[Claim]:
        """Lease up to `limit` due recipients, oldest due first.

        Recipients of a domain whose primary is known to be down are left alone: the
        probes decide when it is worth trying again (`make_due` then), so a backup
        holding mail for a dead primary does not knock on its door with every message.
        """
        now = now or utcnow()
        down = select(domains.c.name).where(domains.c.state == "down")
        due = (
            select(recipients.c.id)
            .where(
                recipients.c.state.in_(sources(Event.CLAIM)),
                recipients.c.next_attempt_at <= now,
                recipients.c.domain.not_in(down),
            )
            .order_by(recipients.c.next_attempt_at)
            .limit(limit)
        )
        values = {
            "state": target(Event.CLAIM),
            "lease_owner": owner,
            "lease_until": now + lease,
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
        async with self.engine.begin() as conn:
            rows = (await conn.execute(statement)).all()
        return sorted((Claim(*row) for row in rows), key=lambda c: c.recipient_id)

    async def park_down(self, until: datetime, now: datetime | None = None) -> int:
        """Due recipients of domains whose primary is down wait until `until` (or until
        a probe finds the primary back and `make_due` releases them).  New mail for a
        dead primary is touched once here instead of being scanned by every claim."""
        now = now or utcnow()
        down = select(domains.c.name).where(domains.c.state == "down")
        async with self.engine.begin() as conn:
            outcome = await conn.execute(
                update(recipients)
                .where(
                    recipients.c.state == State.QUEUED.value,
                    recipients.c.next_attempt_at <= now,
                    recipients.c.domain.in_(down),
                )
                .values(
                    next_attempt_at=until,
                    updated_at=now,
                    # Mail that never got a try still says why it waits.
                    last_error=func.coalesce(
                        recipients.c.last_error,
                        select(domains.c.reason)
                        .where(domains.c.name == recipients.c.domain)
                        .scalar_subquery(),
                    ),
                )
            )
        return outcome.rowcount

    async def record(
        self, owner: str, results: Sequence[Result], notices: Sequence[NewMessage] = ()
    ) -> int:
        """Apply delivery results to recipients this owner still holds; return rows changed.

        `notices` (DSNs for these results) are queued in the same transaction, so a
        recipient is never bounced without its DSN (invariant 2).  Results of
        concurrent deliveries share a transaction (group commit, as on receipt), so
        a flush does not pay one fsync per message.
        """
        report = _Report(owner, results, notices)
        await self._recorder.submit(report)
        return report.changed

    async def _record_batch(self, batch: Sequence[_Report]) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer_thread, self._record_now, batch)

    def _record_now(self, batch: Sequence[_Report]) -> None:
        """In the writer thread: every report of the batch in one transaction."""
        assert self._writer_engine is not None
        now = utcnow()
        notices = [n for report in batch for n in report.notices]
        with self._writer_engine.begin() as conn:
            if notices:
                assert self._inserter is not None
                self._inserter.insert(conn, notices, now)
            for report in batch:
                report.changed = 0
                for event, params in _result_params(report, now).items():
                    outcome = conn.execute(_RESULT_STATEMENTS[event], params)
                    report.changed += outcome.rowcount

    @staticmethod
    async def _insert(conn: AsyncConnection, batch: Sequence[NewMessage], now: datetime) -> None:
        if batch:
            message_rows, recipient_rows = _rows(batch, now)
            await conn.execute(insert(messages), message_rows)
            await conn.execute(insert(recipients), recipient_rows)

    async def outbound(self, ids: Iterable[str]) -> dict[str, Outbound]:
        query = select(*_OUTBOUND_COLUMNS).where(messages.c.id.in_(list(ids)))
        async with self.engine.connect() as conn:
            return {row.id: _outbound(row) for row in await conn.execute(query)}

    async def make_due(
        self,
        *,
        domain: str | None = None,
        ids: Sequence[str] | None = None,
        retry_down: bool = False,
        now: datetime | None = None,
    ) -> int:
        """Queued recipients (of a domain, of some messages, or all) become due now:
        a flush, an ETRN, or a primary that came back.  With `retry_down` (an
        operator's flush), domains marked down are tried again too."""
        now = now or utcnow()
        if retry_down:
            async with self.engine.begin() as conn:
                await conn.execute(
                    update(domains)
                    .where(
                        domains.c.state == "down", *([domains.c.name == domain] if domain else [])
                    )
                    .values(state="unknown", since=now, updated_at=now)
                )
        condition = [recipients.c.state == State.QUEUED.value, recipients.c.next_attempt_at > now]
        if domain is not None:
            condition.append(recipients.c.domain == domain)
        if ids is not None:
            async with self.engine.connect() as conn:
                await self._require(conn, ids)
            condition.append(recipients.c.message_id.in_(ids))
        async with self.engine.begin() as conn:
            outcome = await conn.execute(
                update(recipients).where(*condition).values(next_attempt_at=now, updated_at=now)
            )
        return outcome.rowcount

    async def pending_domains(self) -> list[str]:
        """Domains with recipients waiting for delivery (queued or being sent)."""
        query = (
            select(recipients.c.domain)
            .where(recipients.c.state.in_([State.QUEUED.value, State.SENDING.value]))
            .distinct()
        )
        async with self.engine.connect() as conn:
            return sorted((await conn.execute(query)).scalars())

    async def sweep(
        self,
        event: Event | None,
        notices_for: Callable[[list[Overdue]], list[NewMessage]],
        *,
        older_than: datetime | None = None,
        ids: Sequence[str] | None = None,
        limit: int = 500,
        now: datetime | None = None,
    ) -> int:
        """Pending recipients of messages received before `older_than` (or of the
        messages `ids`): apply `event` (EXPIRE, BOUNCE), or with None mark them
        delay-warned; queue their DSNs in the same transaction (invariant 2)."""
        now = now or utcnow()
        states = sources(event) if event else [State.QUEUED.value, State.HELD.value]
        query = (
            select(
                recipients.c.id.label("recipient_id"), recipients.c.address,
                recipients.c.dsn_notify, recipients.c.dsn_orcpt, recipients.c.last_error,
                *_OUTBOUND_COLUMNS,
            )
            .join(messages, messages.c.id == recipients.c.message_id)
            .where(recipients.c.state.in_(states))
            .order_by(messages.c.received_at)
            .limit(limit)
        )  # fmt: skip
        if event is None:
            query = query.where(recipients.c.delay_warned == false())
        if older_than is not None:
            query = query.where(messages.c.received_at < older_than)
        if ids is not None:
            query = query.where(messages.c.id.in_(ids))
        async with self.engine.begin() as conn:
            if ids is not None:
                await self._require(conn, ids)
            rows = (await conn.execute(query)).all()
            if not rows:
                return 0
            overdue = [
                Overdue(
                    r.recipient_id, r.address, r.dsn_notify, r.dsn_orcpt, r.last_error, _outbound(r)
                )
                for r in rows
            ]
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
            await self._insert(conn, notices_for(overdue), now)
        return len(overdue)

    async def set_domain_state(
        self,
        name: str,
        state: str | None = None,
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
                values.setdefault("state", "unknown")
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
                r.name, r.state, r.since, r.route, r.reason, r.last_probe_at, r.last_probe_result
            )
            for r in rows
        }

    async def release_expired_leases(self, now: datetime | None = None) -> int:
        """sending rows whose lease ran out (their worker died) become queued again."""
        now = now or utcnow()
        return await self._transition(
            Event.LEASE_EXPIRED,
            recipients.c.lease_until < now,
            now,
            {"lease_owner": None, "lease_until": None},
        )

    async def release_leases(self, owner: str, now: datetime | None = None) -> int:
        """Give back every lease `owner` holds (clean shutdown, or start-up after a crash)."""
        now = now or utcnow()
        return await self._transition(
            Event.LEASE_EXPIRED,
            recipients.c.lease_owner == owner,
            now,
            {"lease_owner": None, "lease_until": None},
        )

    # ------------------------------------------------------------------ admin

    async def hold(self, ids: Sequence[str]) -> int:
        return await self._admin_transition(ids, Event.HOLD, {})

    async def release(self, ids: Sequence[str]) -> int:
        return await self._admin_transition(ids, Event.RELEASE, {"next_attempt_at": utcnow()})

    async def delete(self, ids: Sequence[str]) -> int:
        async with self.engine.begin() as conn:
            await self._require(conn, ids)
            await conn.execute(delete(recipients).where(recipients.c.message_id.in_(ids)))
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

    async def _transition(
        self, event: Event, condition: Any, now: datetime, extra: dict[str, Any]
    ) -> int:
        async with self.engine.begin() as conn:
            outcome = await conn.execute(
                update(recipients)
                .where(recipients.c.state.in_(sources(event)), condition)
                .values(state=target(event), updated_at=now, **extra)
            )
        return outcome.rowcount

    @staticmethod
    async def _require(conn: AsyncConnection, ids: Sequence[str]) -> None:
        found = set(
            (await conn.execute(select(messages.c.id).where(messages.c.id.in_(ids)))).scalars()
        )
        missing = set(ids) - found
        if missing:
            raise UnknownMessage(missing)

    # ------------------------------------------------------------------ reading

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
        wanted = select(recipients.c.id).where(recipients.c.message_id == messages.c.id)
        if not include_final:
            wanted = wanted.where(recipients.c.state.in_(_PENDING))
        if domain:
            wanted = wanted.where(recipients.c.domain == domain.lower())
        query = select(*_MESSAGE_COLUMNS).where(wanted.exists()).order_by(messages.c.id)
        after = ""
        while True:
            async with self.engine.connect() as conn:
                page = query.where(messages.c.id > after).limit(size)
                rows = (await conn.execute(page)).all()
                views = await self._views(conn, rows)
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
            return (await self._views(conn, rows))[0]

    async def body(self, message_id: str) -> bytes:
        async with self.engine.connect() as conn:
            body = (
                await conn.execute(select(messages.c.body).where(messages.c.id == message_id))
            ).scalar()
        if body is None:
            raise UnknownMessage([message_id])
        return bytes(body)

    async def _views(self, conn: AsyncConnection, rows: Sequence[Row[Any]]) -> list[MessageView]:
        by_message: dict[str, list[RecipientView]] = {row.id: [] for row in rows}
        ids = list(by_message)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            result = await conn.execute(
                select(recipients)
                .where(recipients.c.message_id.in_(chunk))
                .order_by(recipients.c.id)
            )
            for r in result:
                by_message[r.message_id].append(
                    RecipientView(
                        r.id,
                        r.address,
                        r.domain,
                        r.state,
                        r.attempts,
                        r.next_attempt_at,
                        r.last_error,
                        r.dsn_notify,
                        r.dsn_orcpt,
                    )
                )
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
            )
            for row in rows
        ]

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

    # ------------------------------------------------------------------ protection

    async def recipient_verdict(
        self, address: str, now: datetime | None = None
    ) -> RecipientVerdict | None:
        """The cached verdict on `address`, unless it has expired."""
        query = select(recipient_verdicts).where(
            recipient_verdicts.c.address == address,
            recipient_verdicts.c.expires_at > (now or utcnow()),
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        return RecipientVerdict(
            row.address, row.valid, row.reply, row.source, row.checked_at, row.expires_at
        )

    async def remember_recipients(self, verdicts: Sequence[RecipientVerdict]) -> None:
        """Insert or replace cached verdicts (one transaction)."""
        if not verdicts:
            return
        rows = [
            {
                "address": v.address, "valid": v.valid, "reply": v.reply, "source": v.source,
                "checked_at": v.checked_at, "expires_at": v.expires_at,
            }
            for v in verdicts
        ]  # fmt: skip
        async with self.engine.begin() as conn:
            await conn.execute(self._upsert(recipient_verdicts, ["address"], rows[0]), rows)

    async def learn_recipients(
        self,
        since: datetime,
        positive_ttl: timedelta,
        negative_ttl: timedelta,
        now: datetime | None = None,
    ) -> int:
        """Feed the verification cache from deliveries finished in (since, now]: a
        delivered recipient exists; one the primary bounced with 5.1.x does not.  Other
        5xx (too big, policy) say nothing about the mailbox and are left out, and so are
        held 5xx answers (a primary that came back misconfigured)."""
        now = now or utcnow()
        query = select(
            recipients.c.address, recipients.c.domain, recipients.c.state, recipients.c.last_error
        ).where(
            recipients.c.updated_at > since,
            recipients.c.updated_at <= now,
            or_(
                recipients.c.state == State.DELIVERED.value,
                (recipients.c.state == State.BOUNCED.value)
                & recipients.c.last_error.like("5__ 5.1.%"),
            ),
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        latest: dict[str, RecipientVerdict] = {}
        for row in rows:
            valid = row.state == State.DELIVERED.value
            address = f"{row.address.rpartition('@')[0]}@{row.domain}"
            latest[address] = RecipientVerdict(
                address,
                valid,
                None if valid else row.last_error,
                "delivery",
                now,
                now + (positive_ttl if valid else negative_ttl),
            )
        await self.remember_recipients(list(latest.values()))
        return len(latest)

    async def greylist(
        self,
        client_net: str,
        sender: str,
        recipient: str,
        *,
        delay: timedelta,
        retry_window: timedelta,
        pass_ttl: timedelta,
        now: datetime | None = None,
    ) -> float:
        """Seconds this triplet must still wait before it passes; 0.0 when it passes.

        A new triplet (or one that came back too late, or was last seen longer than
        `pass_ttl` ago) starts waiting now; one retried after `delay` passes and stays
        passed while it is seen at least every `pass_ttl`."""
        now = now or utcnow()
        key = (
            (greylist.c.client_net == client_net)
            & (greylist.c.sender == sender)
            & (greylist.c.recipient == recipient)
        )
        async with self.engine.begin() as conn:
            row = (await conn.execute(select(greylist).where(key))).first()
            stale = row is not None and (
                now - row.last_seen > pass_ttl
                if row.passed_at is not None
                else now - row.first_seen > delay + retry_window
            )
            if row is None or stale:
                fresh = {
                    "client_net": client_net, "sender": sender, "recipient": recipient,
                    "first_seen": now, "last_seen": now, "passed_at": None,
                }  # fmt: skip
                await conn.execute(
                    self._upsert(greylist, ["client_net", "sender", "recipient"], fresh), fresh
                )
                return delay.total_seconds()
            if row.passed_at is not None:
                if now - row.last_seen > GREYLIST_REFRESH:
                    await conn.execute(update(greylist).where(key).values(last_seen=now))
                return 0.0
            waited = now - row.first_seen
            if waited < delay:
                return float((delay - waited).total_seconds())
            await conn.execute(update(greylist).where(key).values(passed_at=now, last_seen=now))
            return 0.0

    async def prune_protection(self, greylist_before: datetime, now: datetime | None = None) -> int:
        """Drop expired verification verdicts and greylist triplets last seen before
        `greylist_before`; return how many rows went."""
        now = now or utcnow()
        async with self.engine.begin() as conn:
            verdicts = await conn.execute(
                delete(recipient_verdicts).where(recipient_verdicts.c.expires_at <= now)
            )
            triplets = await conn.execute(
                delete(greylist).where(greylist.c.last_seen < greylist_before)
            )
        return int(verdicts.rowcount) + int(triplets.rowcount)

    async def spam_record(self, message_id: str) -> SpamRecord:
        query = select(
            messages.c.spam_verdict, messages.c.spam_score, messages.c.spam_detail
        ).where(messages.c.id == message_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            raise UnknownMessage([message_id])
        return SpamRecord(row.spam_verdict, row.spam_score, row.spam_detail)

    def _upsert(self, table: Table, keys: list[str], row: dict[str, Any]) -> Any:
        """INSERT … ON CONFLICT (keys) DO UPDATE, in this backend's dialect."""
        if self.dialect == "postgresql":
            on_postgresql = postgresql.insert(table)
            return on_postgresql.on_conflict_do_update(
                index_elements=keys,
                set_={name: on_postgresql.excluded[name] for name in row if name not in keys},
            )
        on_sqlite = sqlite.insert(table)
        return on_sqlite.on_conflict_do_update(
            index_elements=keys,
            set_={name: on_sqlite.excluded[name] for name in row if name not in keys},
        )
