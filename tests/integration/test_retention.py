"""The queue's cost follows what is pending, on SQLite and on a real PostgreSQL.

Finished messages lose their body in the transaction of their last result and
their record after ``keep_finished``; a down domain's held mail is neither read
nor written by the delivery loop; every query the idle server runs finds its
rows through an index (the query plans are checked); SQLite files are in
``auto_vacuum = INCREMENTAL`` mode, existing ones by migration 0005, and give
their free pages back.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine

from backupmx.queue.database import migrations_directory, upgrade
from backupmx.queue.domains import QUIET_AFTER
from backupmx.queue.inserter import Inserter
from backupmx.queue.nodes import NodeReport
from backupmx.queue.records import NewMessage, Result, utcnow
from backupmx.queue.retention import FORGET_BATCH
from backupmx.queue.state import Event, PrimaryState
from backupmx.queue.store import Store
from tests.support.queued import message


def sized(*addresses: str, size: int) -> NewMessage:
    return message(*addresses, body=b"Subject: t\r\n\r\n" + b"x" * size + b"\r\n")


async def test_a_message_loses_its_body_when_its_last_recipient_is_final(store: Store) -> None:
    m = message("a@example.test", "b@example.test")
    await store.enqueue(m)
    a, b = sorted(await store.claim("node", 10), key=lambda c: c.address)
    await store.record("node", [Result(a.recipient_id, Event.SUCCESS, "250 ok")])
    assert (await store.message(m.id)).finished_at is None
    assert await store.body(m.id) != b""  # b is still pending: the body stays
    await store.record("node", [Result(b.recipient_id, Event.PERMFAIL, "550 5.1.1 unknown")])
    view = await store.message(m.id)
    assert view.finished_at is not None
    assert await store.body(m.id) == b""
    assert [(r.address, r.state, r.last_error) for r in view.recipients] == [
        ("a@example.test", "delivered", "250 ok"),
        ("b@example.test", "bounced", "550 5.1.1 unknown"),
    ]
    assert view.to_json()["finished_at"] is not None
    # Gone from the default listing, still there with --all.
    assert m.id not in {v.id for v in await store.messages()}
    assert m.id in {v.id for v in await store.messages(include_final=True)}


async def test_a_deferred_or_held_recipient_keeps_the_body(store: Store) -> None:
    m = message("a@example.test", "b@example.test")
    await store.enqueue(m)
    a, b = sorted(await store.claim("node", 10), key=lambda c: c.address)
    await store.record(
        "node",
        [
            Result(a.recipient_id, Event.TEMPFAIL, "451 later", utcnow()),
            Result(b.recipient_id, Event.QUARANTINE, "550 held"),
        ],
    )
    assert (await store.message(m.id)).finished_at is None
    assert await store.body(m.id) != b""


async def test_expiry_finishes_the_message_with_its_dsn_queued(store: Store) -> None:
    m = message("a@example.test")
    await store.enqueue(m)
    notices: list[NewMessage] = []

    def dsn(overdue: list[Any]) -> list[NewMessage]:
        notices.extend(message("s@sender.test") for _ in overdue)
        return notices

    swept = await store.sweep(Event.EXPIRE, dsn, older_than=utcnow() + timedelta(seconds=1))
    assert swept == 1
    assert (await store.message(m.id)).finished_at is not None
    assert await store.body(m.id) == b""
    assert len(await store.body(notices[0].id)) > 0  # the DSN is queued, body and all


async def test_finished_records_are_forgotten_after_keep_finished(store: Store) -> None:
    old = [message(f"u{i}@example.test") for i in range(FORGET_BATCH + 3)]
    for m in old:
        await store.enqueue(m)
    claims = await store.claim("node", 10_000)
    await store.record("node", [Result(c.recipient_id, Event.SUCCESS, "250 ok") for c in claims])
    young = message("young@example.test")
    await store.enqueue(young)
    pending = message("pending@example.test")
    await store.enqueue(pending)
    (c,) = [c for c in await store.claim("node", 10) if c.message_id == young.id]
    await store.record("node", [Result(c.recipient_id, Event.SUCCESS, "250 ok")])
    young_finished = (await store.message(young.id)).finished_at
    assert young_finished is not None

    forgotten = await store.forget_finished(young_finished)  # before the young one finished
    assert forgotten == len(old)
    remaining = {v.id for v in await store.messages(include_final=True)}
    assert remaining == {young.id, pending.id}
    # Inside the window, `queue show` still says what happened.
    view = await store.message(young.id)
    assert [(r.state, r.last_error) for r in view.recipients] == [("delivered", "250 ok")]
    assert await store.forget_finished(young_finished) == 0


async def test_a_down_domains_mail_is_neither_claimed_nor_touched(store: Store) -> None:
    held = [message(f"u{i}@down.test") for i in range(50)]
    for m in held:
        await store.enqueue(m)
    await store.enqueue(message("a@up.test"))
    assert await store.pending_domains() == ["down.test", "up.test"]
    await store.set_domain_state("down.test", PrimaryState.DOWN, reason="mx1 refused")
    before = {r.id: r for v in await store.messages() for r in v.recipients}
    # Never tried, yet `queue list` says why the mail waits.
    assert {r.last_error for r in before.values() if r.domain == "down.test"} == {"mx1 refused"}
    for _ in range(3):
        claims = await store.claim("node", 100)
        assert [c.domain for c in claims] in (["up.test"], [])
    after = {r.id: r for v in await store.messages() for r in v.recipients}
    untouched = [i for i, r in before.items() if r.domain == "down.test" and after[i] == r]
    assert len(untouched) == 50
    assert await store.pending_domains() == ["down.test", "up.test"]
    # The primary is back: the mail is due at once, in one statement, without backoff.
    await store.set_domain_state("down.test", PrimaryState.UP)
    claims = await store.claim("node", 100)
    assert len(claims) == 50 and {c.domain for c in claims} == {"down.test"}


async def test_claims_take_the_oldest_due_first_across_domains(store: Store) -> None:
    first = message("a@one.test")
    await store.enqueue(first)
    await store.enqueue(message("b@two.test"))
    await store.enqueue(message("c@one.test"))
    claims = await store.claim("node", 1)
    assert [c.message_id for c in claims] == [first.id]
    claims = await store.claim("node", 5)
    assert sorted(c.address for c in claims) == ["b@two.test", "c@one.test"]


# ---------------------------------------------------------------- the idle loop's queries


async def idle_loop(store: Store) -> None:
    """Every queue query an idle server runs: the delivery loop's poll, the probes'
    list, the housekeeping and the recipient cache's jobs."""
    now = utcnow()
    await store.claim("node", 500)
    await store.pending_domains()
    await store.domain_states()
    await store.heartbeat(
        NodeReport("node", "host", "test", "127.0.0.1:25", 1), timedelta(seconds=30)
    )
    await store.sweep(Event.EXPIRE, lambda overdue: [], older_than=now - timedelta(days=5))
    # Every held message is past its delay warning, and was warned by the first run.
    while await store.sweep(None, lambda overdue: [], older_than=now + timedelta(seconds=1)):
        pass
    await store.forget_finished(now - timedelta(days=7))
    await store.forget_quiet_domains(lambda name: name == "down.test", now)
    await store.learn_recipients(now, timedelta(days=1), timedelta(days=1))
    await store.prune_protection(now - timedelta(days=2))


async def hold(store: Store, recipients: int) -> None:
    """`recipients` more recipients held for down.test, due now (never tried)."""
    for i in range(recipients // 100):
        await store.enqueue(message(*(f"u{i}-{j}@down.test" for j in range(100))))


async def fill(store: Store) -> None:
    """2,000 recipients held for a down domain, 200 delivered ones, one up domain."""
    await store.enqueue(message(*(f"d{j}@up.test" for j in range(200))))
    claims = await store.claim("node", 1000)
    await store.record("node", [Result(c.recipient_id, Event.SUCCESS, "250") for c in claims])
    await store.set_domain_state("up.test", PrimaryState.UP)
    await store.set_domain_state("down.test", PrimaryState.DOWN)
    await hold(store, 2000)


def captured(store: Store) -> tuple[list[tuple[str, Any]], Callable[[], None]]:
    """The store's statements from now on, on every engine it has: the asyncio engine's
    and the deliveries' writer thread's (claims and results, once the store is started)."""
    statements: list[tuple[str, Any]] = []

    def keep(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE", "WITH")):
            statements.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", keep)
    return statements, lambda: event.remove(Engine, "before_cursor_execute", keep)


async def idle_statements(store: Store) -> list[tuple[str, Any]]:
    """The statements of an idle loop's run, after a first run has done what was due."""
    await idle_loop(store)
    statements, stop = captured(store)
    try:
        await idle_loop(store)
    finally:
        stop()
    assert len(statements) >= 9
    return statements


QUEUE_TABLES = ("recipients", "messages")


async def test_the_idle_loop_reads_the_queue_through_indexes(
    store: Store, database_url: str
) -> None:
    await fill(store)
    statements = await idle_statements(store)
    plans = (
        sqlite_plans(database_url, statements)
        if store.dialect == "sqlite"
        else postgres_plans(database_url, statements)
    )
    for statement, plan in plans:
        scans = full_scans(plan, store.dialect)
        assert not scans, f"{scans} in the plan of\n{statement}\n{plan}"


async def test_the_idle_loop_costs_the_same_with_ten_times_as_much_held(
    store: Store, database_url: str
) -> None:
    """Each idle statement's work (SQLite: virtual-machine steps; PostgreSQL: rows read
    from the queue's tables) with 2,000 and with 20,000 recipients held."""
    await fill(store)
    measure = sqlite_steps if store.dialect == "sqlite" else postgres_rows_read
    small = measure(database_url, await idle_statements(store))
    await hold(store, 18_000)
    large = measure(database_url, await idle_statements(store))
    assert len(small) == len(large)
    for (statement, before), (_, after) in zip(small, large, strict=True):
        assert after <= before * 1.2 + 100, f"{before} -> {after}:\n{statement}"


def sqlite_steps(url: str, statements: list[tuple[str, Any]]) -> list[tuple[str, int]]:
    connection = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 10
        return 0

    connection.set_progress_handler(count, 10)
    try:
        measured = []
        for statement, parameters in statements:
            steps = 0
            connection.execute("BEGIN")
            connection.execute(statement, parameters).fetchall()
            connection.execute("ROLLBACK")
            measured.append((statement, steps))
        return measured
    finally:
        connection.close()


def postgres_rows_read(url: str, statements: list[tuple[str, Any]]) -> list[tuple[str, int]]:
    def rows(node: dict[str, Any]) -> int:
        own = 0
        if node.get("Relation Name") in QUEUE_TABLES:
            loops = node.get("Actual Loops", 1)
            own = (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)) * loops
        return own + sum(rows(child) for child in node.get("Plans", []))

    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as connection:
        measured = []
        for statement, parameters in statements:
            # A table of a few pages is read whole, which is right at that size: priced
            # out here, the plans are the ones PostgreSQL picks for a large queue.
            connection.execute("SET LOCAL enable_seqscan = off")
            explain = "EXPLAIN (ANALYZE, FORMAT JSON) " + statement
            ((plan,),) = connection.execute(explain, parameters).fetchall()  # type: ignore[arg-type]
            connection.rollback()
            measured.append((statement, rows(plan[0]["Plan"])))
        return measured


def sqlite_plans(url: str, statements: list[tuple[str, Any]]) -> list[tuple[str, str]]:
    connection = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        return [
            (s, "\n".join(row[3] for row in connection.execute("EXPLAIN QUERY PLAN " + s, p)))
            for s, p in statements
        ]
    finally:
        connection.close()


def postgres_plans(url: str, statements: list[tuple[str, Any]]) -> list[tuple[str, str]]:
    # With sequential scans priced out, a Seq Scan left in a plan means no index fits.
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as connection:
        plans = []
        for s, p in statements:
            connection.execute("SET LOCAL enable_seqscan = off")
            rows = connection.execute("EXPLAIN " + s, p).fetchall()  # type: ignore[arg-type]
            plans.append((s, "\n".join(row[0] for row in rows)))
            connection.rollback()
        return plans


def full_scans(plan: str, dialect: str) -> list[str]:
    """The plan's lines that read a whole queue table or a whole index of one."""
    tables = "|".join(QUEUE_TABLES)
    if dialect == "sqlite":
        return re.findall(rf"^SCAN (?:{tables})\b.*$", plan, re.MULTILINE)
    found = re.findall(rf"Seq Scan on (?:{tables})\b.*", plan)
    # An index scan without an Index Cond walks the whole index.
    nodes = re.split(r"\n(?=\s*->)", plan)
    for node in nodes:
        if (
            re.search(rf"Index (?:Only )?Scan .*on (?:{tables})\b", node)
            and "Index Cond" not in node
        ):
            found.append(node.strip().splitlines()[0])
    return found


# ---------------------------------------------------------------- SQLite's file


def sqlite_pragma(path: Path, name: str) -> int:
    connection = sqlite3.connect(path)
    try:
        value: int = connection.execute(f"PRAGMA {name}").fetchone()[0]
        return value
    finally:
        connection.close()


async def test_a_new_sqlite_queue_is_in_incremental_vacuum_mode(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'queue.db'}")
    await upgrade(store.engine)
    await store.engine.dispose()
    assert sqlite_pragma(tmp_path / "queue.db", "auto_vacuum") == 2


async def test_migrations_turn_an_existing_queue_into_the_new_one(tmp_path: Path) -> None:
    """A queue made before this release (revision 0003, no auto_vacuum) with a finished
    and a pending message: the finished one loses its body, the pending domain gets its
    row, and the file is rebuilt in incremental mode."""
    path = tmp_path / "queue.db"
    legacy = sqlite3.connect(path)  # a table before any of ours: the mode sticks to the file
    legacy.execute("PRAGMA auto_vacuum = NONE")
    legacy.execute("CREATE TABLE made_before (x)")
    legacy.commit()
    legacy.close()
    assert sqlite_pragma(path, "auto_vacuum") == 0
    store = Store.open(f"sqlite:///{path}")

    def to_0003(connection: Connection) -> None:
        config = Config()
        config.set_main_option("script_location", str(migrations_directory()))
        config.attributes["connection"] = connection
        command.upgrade(config, "0003")
        now = "2026-12-01 10:00:00.000000"
        for mid, state in (("done", "delivered"), ("wait", "queued")):
            connection.exec_driver_sql(
                "INSERT INTO messages (id, sender, body, size, sha256, received_at, client_ip,"
                " client_helo, protocol, body_type, smtputf8, session_id) VALUES"
                f" ('{mid}', '', ?, 200000, 'x', '{now}', '127.0.0.1', 'h', 'ESMTP', '7BIT',"
                " 0, 's')",
                (b"x" * 200_000,),
            )
            connection.exec_driver_sql(
                "INSERT INTO recipients (message_id, address, domain, state, attempts,"
                f" next_attempt_at, updated_at) VALUES ('{mid}', 'a@{mid}.test',"
                f" '{mid}.test', '{state}', 1, '{now}', '{now}')"
            )

    async with store.engine.connect() as conn:
        await conn.run_sync(to_0003)
        await conn.commit()
    assert sqlite_pragma(path, "auto_vacuum") == 0
    await upgrade(store.engine)
    try:
        assert sqlite_pragma(path, "auto_vacuum") == 2
        done = await store.message("done")
        assert done.finished_at is not None and await store.body("done") == b""
        assert (await store.message("wait")).finished_at is None
        assert len(await store.body("wait")) == 200_000
        assert await store.pending_domains() == ["wait.test"]
    finally:
        await store.engine.dispose()


async def test_sqlite_gives_freed_pages_back(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    store = Store.open(f"sqlite:///{path}")
    await upgrade(store.engine)
    await store.start()
    try:
        for _ in range(10):
            batch = [sized(f"u{i}@example.test", size=100_000) for i in range(100)]
            for m in batch:
                await store.enqueue(m)
        claims = await store.claim("node", 10_000)
        await store.record("node", [Result(c.recipient_id, Event.SUCCESS, "250") for c in claims])
        free_before = sqlite_pragma(path, "freelist_count")
        size_before = path.stat().st_size
        assert free_before * 4096 > 64 * 1024**2  # 100 MB of bodies went to the free list
        excess = free_before * 4096 - 64 * 1024**2  # beyond the slack kept for new mail
        given = await store.give_back_space()
        assert given >= excess * 0.95
        assert path.stat().st_size <= size_before - given * 0.95
        assert sqlite_pragma(path, "freelist_count") * 4096 <= 64 * 1024**2
    finally:
        await store.close()


async def test_domains_of_new_mail_get_their_row(store: Store) -> None:
    await store.enqueue(message("a@new.test", "b@other.test"))
    async with store.engine.connect() as conn:
        rows = (await conn.execute(text("SELECT name, state FROM domains ORDER BY name"))).all()
    assert [tuple(r) for r in rows] == [("new.test", "unknown"), ("other.test", "unknown")]
    # A row that exists keeps its state.
    await store.set_domain_state("new.test", PrimaryState.DOWN)
    await store.enqueue(message("c@new.test"))
    assert (await store.domain_states())["new.test"].state is PrimaryState.DOWN


async def test_quiet_domains_rows_go_but_not_the_backed_up_ones_nor_those_with_mail(
    store: Store,
) -> None:
    """A DSN's destination keeps its row while mail waits for it; once nothing is
    pending and the row has been quiet for `QUIET_AFTER`, it goes, unless the
    domain is backed up (its primary state is the operator's to watch)."""
    delivered = message("a@sender.test", "b@ours.test")
    await store.enqueue(delivered)
    claims = await store.claim("node", 10)
    await store.record("node", [Result(c.recipient_id, Event.SUCCESS, "250") for c in claims])
    await store.enqueue(message("c@waiting.test"))
    held = message("d@held.test")
    await store.enqueue(held)
    await store.hold([r.id for r in (await store.message(held.id)).recipients])

    def ours(name: str) -> bool:
        return name == "ours.test"

    assert await store.forget_quiet_domains(ours) == 0  # nothing quiet for long enough yet
    later = utcnow() + QUIET_AFTER + timedelta(seconds=1)
    assert await store.forget_quiet_domains(ours, later) == 1
    assert sorted(await store.domain_states()) == ["held.test", "ours.test", "waiting.test"]
    # New mail for a forgotten domain brings its row back.
    await store.enqueue(message("e@sender.test"))
    assert "sender.test" in await store.pending_domains()


async def test_a_domain_row_is_not_forgotten_under_mail_being_queued(store: Store) -> None:
    """The intake's transaction queues mail for a domain whose row looks quiet while
    `forget_quiet_domains` runs: the row must survive, or the probes would never see
    that mail (they find pending mail through the domains' rows).  On PostgreSQL a
    plain DELETE would not wait: the inserter's ON CONFLICT DO NOTHING locks nothing."""
    await store.enqueue(message("a@sender.test"))
    claims = await store.claim("node", 10)
    await store.record("node", [Result(c.recipient_id, Event.SUCCESS, "250") for c in claims])
    later = utcnow() + QUIET_AFTER + timedelta(seconds=1)
    inserter = Inserter(store.engine.dialect)
    arriving = message("b@sender.test")
    async with store.engine.begin() as conn:
        await conn.run_sync(lambda sync: inserter.insert(sync, [arriving], utcnow()))
        forgetting = asyncio.create_task(store.forget_quiet_domains(lambda _: False, later))
        await asyncio.sleep(0.5)  # the delete has started and waits for this transaction
    assert await asyncio.wait_for(forgetting, 30) == 0
    assert await store.pending_domains() == ["sender.test"]


async def test_an_idle_claim_is_one_statement_whatever_the_number_of_domains(
    store: Store,
) -> None:
    """Open domains with nothing due (mail deferred by backoff, or none at all) cost
    an idle poll one seek each inside one statement of fixed text, not an arm each
    in a statement that grows with them."""
    deferred = message("a@deferred.test")
    await store.enqueue(deferred)
    (claim,) = await store.claim("node", 10)
    later = utcnow() + timedelta(hours=1)
    await store.record("node", [Result(claim.recipient_id, Event.TEMPFAIL, "451 later", later)])

    async def idle_claim() -> list[str]:
        statements, stop = captured(store)
        try:
            assert await store.claim("node", 500) == []
        finally:
            stop()
        return [statement for statement, _ in statements]

    few = await idle_claim()
    for i in range(300):
        await store.set_domain_state(f"d{i}.test", PrimaryState.UP)
    many = await idle_claim()
    assert len(few) == 1
    assert many == few
