"""Finished messages: their bodies leave at once, their records after ``keep_finished``.

A message is *finished* when none of its recipients is pending any more (all are
delivered, bounced or expired; docs/queue.md, invariant 9).

Promises:

* `finish` is the one place that marks messages finished and deletes their
  bodies.  It runs in the transaction that makes a message's last recipient
  final, the one that also queues the DSN for it (`backupmx.queue.results`:
  delivery results, expiry and an operator's bounce), so the queue's size tracks
  what is pending, and no body is dropped before its DSN (which carries it) is
  queued.
* `forget_finished` deletes the records of messages finished before a moment
  (message row and recipients, and with these their attempt history,
  `backupmx.queue.attempts`, by ``ON DELETE CASCADE``; the body is long gone),
  `FORGET_BATCH` messages
  per transaction, so that receiving, which waits for SQLite's one writer,
  waits for one short batch at most.
* `give_back_space` (SQLite) hands free pages back to the filesystem with
  ``PRAGMA incremental_vacuum``, `VACUUM_PAGES` per transaction, while more than
  `SLACK_BYTES` are free.  The file is in ``auto_vacuum = INCREMENTAL`` mode
  (migration 0005).  Pages freed by delivered bodies are first reused by new
  mail, so under a steady flow little is ever returned; after an outage's backlog
  is flushed the file shrinks back over a few housekeeping runs.  PostgreSQL
  keeps bodies out of line (TOAST) and its autovacuum reuses the space of
  deleted rows; nothing is done here.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.sql import Executable

from backupmx.queue.database import SQLITE_BUSY_TIMEOUT_MS, QueueDatabase
from backupmx.queue.models import bodies, messages, recipients
from backupmx.queue.state import PENDING

FORGET_BATCH = 500
VACUUM_PAGES = 2048  # 8 MiB of 4 KiB pages per transaction
SLACK_BYTES = 64 * 1024**2  # free pages kept for the next mail instead of given back


def finish(message_ids: Any, now: datetime) -> list[Executable]:
    """Mark the messages `message_ids` (a list, or a SELECT of ids) finished at `now` if
    none of their recipients is pending any more, and delete the bodies of those: the
    statements, in order, for the caller's transaction."""
    pending = select(recipients.c.id).where(
        recipients.c.message_id == messages.c.id, recipients.c.state.in_(sorted(PENDING))
    )
    finished = select(messages.c.id).where(
        messages.c.id.in_(message_ids), messages.c.finished_at.is_not(None)
    )
    return [
        update(messages)
        .where(messages.c.id.in_(message_ids), messages.c.finished_at.is_(None), ~pending.exists())
        .values(finished_at=now),
        delete(bodies).where(bodies.c.message_id.in_(finished)),
    ]


class Retention(QueueDatabase):
    async def forget_finished(self, before: datetime, budget: float = 30.0) -> int:
        """Delete the records of messages finished before `before`, oldest first, one
        batch per transaction, until none is left or `budget` seconds have passed;
        return how many messages went."""
        deadline = time.monotonic() + budget
        oldest = (
            select(messages.c.id)
            .where(messages.c.finished_at < before)
            .order_by(messages.c.finished_at)
            .limit(FORGET_BATCH)
        )
        forgotten = 0
        while True:
            async with self.engine.begin() as conn:
                ids = list((await conn.execute(oldest)).scalars())
                if ids:
                    await conn.execute(delete(recipients).where(recipients.c.message_id.in_(ids)))
                    await conn.execute(delete(messages).where(messages.c.id.in_(ids)))
            forgotten += len(ids)
            if len(ids) < FORGET_BATCH or time.monotonic() > deadline:
                return forgotten

    async def give_back_space(self, budget: float = 10.0) -> int:
        """SQLite: return free pages beyond `SLACK_BYTES` to the filesystem, a bounded
        number per transaction, for at most `budget` seconds; return the bytes given
        back.  PostgreSQL: 0 (see the module docstring)."""
        path = make_url(self.url).database
        if self.dialect != "sqlite" or not path:
            return 0
        return await asyncio.to_thread(_give_back, path, time.monotonic() + budget)


def _give_back(path: str, deadline: float) -> int:
    """In a thread, on a connection of its own: the pragma frees one page per step, and
    only ``executescript`` (sqlite3_exec) steps it to the end; each run is its own
    short write transaction."""
    connection = sqlite3.connect(path, isolation_level=None, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
    try:
        connection.execute("PRAGMA synchronous=FULL")
        page_size: int = connection.execute("PRAGMA page_size").fetchone()[0]
        given = 0
        while time.monotonic() < deadline:
            free: int = connection.execute("PRAGMA freelist_count").fetchone()[0]
            excess = free - SLACK_BYTES // page_size
            if excess <= 0:
                break
            connection.executescript(f"PRAGMA incremental_vacuum({min(excess, VACUUM_PAGES)});")
            after: int = connection.execute("PRAGMA freelist_count").fetchone()[0]
            if after >= free:  # not in incremental mode (a file not yet migrated)
                break
            given += (free - after) * page_size
        return given
    finally:
        connection.close()
