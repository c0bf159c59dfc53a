"""Opening the queue database, per backend, and bringing its schema up to date.

SQLite (the embedded default): WAL journal, ``synchronous=FULL`` (NORMAL can lose
the last commits on power loss), a busy timeout so the CLI and the server can
share the file, and ``BEGIN IMMEDIATE`` for every transaction, because Python's
sqlite3 does not begin before a SELECT and a deferred transaction that later
writes can fail with SQLITE_BUSY half-way.

PostgreSQL: psycopg 3, default (durable) commit; a session idle in a transaction
for `IDLE_IN_TRANSACTION_MS` is ended by the server (a stopped node's locks).

`storage_full` recognises "disk full" on both backends, so that the receiver
can answer ``452 4.3.1`` instead of the generic ``451 4.3.0``.

`QueueDatabase` is what the store's role files (`backupmx.queue.store`) share:
the engine, its backend's name, the clock the nodes agree on, and the check that
queue ids exist.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, func, select
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from backupmx.queue.models import messages
from backupmx.queue.records import UnknownMessage, utcnow

_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+psycopg"}
_SYNC_DRIVERS = {"sqlite": "sqlite+pysqlite", "postgresql": "postgresql+psycopg"}
SQLITE_BUSY_TIMEOUT_MS = 10_000
# A process stopped in the middle of a transaction (SIGSTOP, a frozen VM) would hold its
# row locks for as long as it is stopped, and keep the other nodes from taking over its
# work; PostgreSQL ends such a session after this long idle in a transaction.  No
# transaction of ours waits on anything but the database between its statements.
IDLE_IN_TRANSACTION_MS = 10_000
POSTGRES_OPTIONS = {"options": f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}"}


def driver_url(url: str, drivers: dict[str, str]) -> str:
    """Pick our driver for a plain sqlite:// or postgresql:// URL."""
    parsed = make_url(url)
    driver = drivers.get(parsed.get_backend_name())
    if driver is None:
        raise ValueError(f"unsupported database {parsed.get_backend_name()!r}")
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


def open_engine(url: str) -> AsyncEngine:
    """The asyncio engine every stage uses (aiosqlite or psycopg's async mode)."""
    full = driver_url(url, _ASYNC_DRIVERS)
    if full.startswith("sqlite"):
        engine = create_async_engine(full, pool_size=4, max_overflow=4)
        _setup_sqlite(engine.sync_engine)
        return engine
    return create_async_engine(
        full, pool_size=8, max_overflow=8, pool_pre_ping=True, connect_args=POSTGRES_OPTIONS
    )


def open_writer_engine(url: str) -> Engine:
    """A plain engine for the group-commit thread: one hop to the thread per batch
    instead of one per statement (aiosqlite), which measured 3x the batch latency."""
    full = driver_url(url, _SYNC_DRIVERS)
    if full.startswith("sqlite"):
        engine = create_engine(full, pool_size=1, max_overflow=0)
        _setup_sqlite(engine)
        return engine
    return create_engine(
        full, pool_size=1, max_overflow=0, pool_pre_ping=True, connect_args=POSTGRES_OPTIONS
    )


class QueueDatabase:
    """The queue database as every role of the store uses it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = open_engine(url)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    async def database_now(self, conn: AsyncConnection) -> datetime:
        """The clock every node agrees on: the database's on PostgreSQL (nodes whose own
        clocks disagree still agree on whose heartbeat is too old); SQLite has one host."""
        if self.dialect == "postgresql":
            value: datetime = (await conn.execute(select(func.now()))).scalar_one()
            return value
        return utcnow()

    @staticmethod
    async def _require(conn: AsyncConnection, ids: Sequence[str]) -> None:
        """Raise `UnknownMessage` naming the ids that are not in the queue."""
        found = set(
            (await conn.execute(select(messages.c.id).where(messages.c.id.in_(ids)))).scalars()
        )
        missing = set(ids) - found
        if missing:
            raise UnknownMessage(missing)


def _setup_sqlite(engine: Engine) -> None:
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_begin_immediate)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Hand transaction control to SQLAlchemy's "begin" event below.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # Takes effect when a new file's first table is created; an existing file is
    # rebuilt into this mode once, by migration 0005.
    cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin_immediate(connection: Connection) -> None:
    # A migration's autocommit block (VACUUM, migration 0005) runs outside any transaction.
    if connection.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def safe_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def missing_sqlite_file(database: str) -> str | None:
    """The path of an SQLite queue whose file does not exist, else None.  Opening it would
    create an empty file, and a typo (or a moved file) would look like an empty queue."""
    url = make_url(database)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        return url.database
    return None


def storage_full(error: BaseException) -> bool:
    """True for SQLITE_FULL, PostgreSQL's disk_full (53100) and ENOSPC."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if getattr(current, "sqlite_errorcode", None) == 13:  # SQLITE_FULL
            return True
        if getattr(current, "sqlstate", None) == "53100":
            return True
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return False


def migrations_directory() -> Path:
    """alembic/ of a source checkout (editable install), or backupmx/migrations of a wheel."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "migrations", package.parent / "alembic"):
        if (candidate / "env.py").exists():
            return candidate
    raise FileNotFoundError("alembic migrations not found next to the backupmx package")


async def upgrade(engine: AsyncEngine) -> None:
    """alembic upgrade head, on this engine (serve runs it at start-up)."""
    # alembic is imported where it is used: it costs a CLI verb a tenth of a second.
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_directory()))

    def run(connection: Connection) -> None:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    # Not engine.begin(): alembic begins and commits its own transactions (one per
    # migration), which migration 0005 needs to run VACUUM outside of them.
    async with engine.connect() as connection:
        await connection.run_sync(run)


def head_revision() -> str | None:
    """The schema revision this version of backupmx expects."""
    head: str | None = _migrations().get_current_head()
    return head


def known_revision(revision: str) -> bool:
    """A revision of this version's migrations (else a newer backupmx wrote it)."""
    from alembic.util import CommandError

    try:
        return _migrations().get_revision(revision) is not None
    except CommandError:
        return False


def _migrations() -> Any:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(migrations_directory()))
    return ScriptDirectory.from_config(config)


async def current_revision(engine: AsyncEngine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    def read(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with engine.connect() as connection:
        return await connection.run_sync(read)
