"""The inserts of new messages, their bodies and recipients, at the driver's own speed.

Every writer of new mail uses it: the intake process (received messages,
`backupmx.queue.intake`), the results writer and the sweeps (DSNs queued with
the results that caused them, `backupmx.queue.results`).  Every new recipient starts
``queued`` and due at once, and its domain has a row in ``domains`` from the
same transaction on (state ``unknown`` if it is new): the delivery loop and the
probes find pending mail through the domains (`backupmx.queue.claims`).

Theory of operation.  The statements are compiled once per table for the
writer's dialect and run with the driver's ``executemany``: SQLAlchemy's
per-execution machinery measured more CPU than SQLite's work itself.  The
inserts run in the caller's transaction; on any error the caller's transaction
fails and nothing of the batch is visible.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Table, insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect

from backupmx.queue.models import bodies, domains, messages, recipients
from backupmx.queue.records import NewMessage
from backupmx.queue.state import PrimaryState, State


def _insert_rows(
    batch: Sequence[NewMessage], now: datetime
) -> list[tuple[Table, list[dict[str, Any]]]]:
    """Insert rows for new messages, their bodies and their recipients (queued, due now),
    table by table in the order the foreign keys want them."""
    contents = [m.body.read() for m in batch]
    message_rows = [
        {
            "id": m.id, "sender": m.sender, "size": len(body),
            "sha256": hashlib.sha256(body).hexdigest(), "received_at": m.received_at,
            "client_ip": m.client_ip,
            "client_helo": m.client_helo, "protocol": m.protocol, "tls": m.tls,
            "body_type": m.body_type, "smtputf8": m.smtputf8, "dsn_ret": m.ret,
            "dsn_envid": m.envid, "session_id": m.session_id,
            "spam_verdict": m.spam_verdict, "spam_score": m.spam_score,
            "spam_detail": m.spam_detail,
        }
        for m, body in zip(batch, contents, strict=True)
    ]  # fmt: skip
    body_rows = [
        {"message_id": m.id, "body": body} for m, body in zip(batch, contents, strict=True)
    ]
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
    return [(messages, message_rows), (bodies, body_rows), (recipients, recipient_rows)]


def _domain_rows(batch: Sequence[NewMessage], now: datetime) -> list[dict[str, Any]]:
    """A ``domains`` row for each recipient domain of the batch, to insert unless present."""
    names = sorted({r.domain for m in batch for r in m.recipients})
    unknown = PrimaryState.UNKNOWN.value
    return [{"name": n, "state": unknown, "since": now, "updated_at": now} for n in names]


def _new_domains(dialect: Dialect) -> Any:
    """INSERT INTO domains … that leaves a domain already known as it is."""
    dialects = {"sqlite": sqlite, "postgresql": postgresql}
    return dialects[dialect.name].insert(domains).on_conflict_do_nothing(index_elements=["name"])


class Inserter:
    """The inserts, compiled once for one dialect (see the module docstring)."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._prepared: dict[str, tuple[str, list[str], list[Any]]] = {}
        self._new_domains = _new_domains(dialect)

    def insert(self, conn: Connection, batch: Sequence[NewMessage], now: datetime) -> None:
        """New messages, all their recipients queued and due `now`, in `conn`'s transaction."""
        cursor = conn.connection.cursor()
        try:
            for table, rows in _insert_rows(batch, now):
                if rows:
                    cursor.executemany(*self._parameters(table, rows))
        finally:
            cursor.close()
        conn.execute(self._new_domains, _domain_rows(batch, now))

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
