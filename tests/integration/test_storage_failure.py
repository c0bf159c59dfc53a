"""Storage failures answer 4xx, never 250 or 5xx, and the server recovers
(docs/queue.md#invariants, invariant 1).

Each test runs a real `backupmx serve` and breaks its real database underneath
it: SQLite on a small tmpfs that the test fills up, SQLite write-locked by
another connection for longer than the busy timeout, PostgreSQL switched to
read-only.  A message that cannot be stored must get ``452 4.3.1`` (storage
full) or ``451 4.3.0`` (anything else), the process must keep serving, and
once the storage is back the next message gets ``250`` and is in the queue.
"""

from __future__ import annotations

import errno
import smtplib
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from backupmx.queue.database import SQLITE_BUSY_TIMEOUT_MS
from tests.support.server import DOMAIN, POSTGRES_ADMIN_URL, ServerProcess

BUSY_TIMEOUT = SQLITE_BUSY_TIMEOUT_MS / 1000


def send(server: ServerProcess, tag: str, size: int = 0, timeout: float = 30.0) -> tuple[int, str]:
    """One message to tag@example.test over a fresh session; the reply to its final dot."""
    line = b"y" * 76 + b"\r\n"
    body = f"Subject: {tag}\r\n\r\n".encode() + line * (size // len(line) + 1)
    with smtplib.SMTP(server.host, server.port, timeout=timeout) as client:
        client.ehlo("client.test")
        assert client.mail(f"{tag}@sender.test")[0] == 250
        assert client.rcpt(f"{tag}@{DOMAIN}")[0] == 250
        code, reply = client.data(body)
    return code, reply.decode()


def queued_tags(server: ServerProcess) -> set[str]:
    """The tags (recipient local parts) of every message in the queue."""
    return {r["address"].split("@")[0] for m in server.queue() for r in m["recipients"]}


def assert_deferred(code: int, text: str, expected: str) -> None:
    """A message that could not be stored: a 4xx (never 250 or 5xx), the expected one."""
    assert 400 <= code < 500, f"storage failure answered {code} {text!r}, not 4xx"
    assert f"{code} {text}".startswith(expected), f"{code} {text!r}, expected {expected}"


# --------------------------------------------------------------------------- disk full


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs for the SQLite file, unmounted after the test."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> int:
    """Write to `path` until the file system is full; return the bytes written."""
    block = b"\0" * 65536
    written = 0
    with path.open("wb", buffering=0) as file:
        for _ in range(100_000):  # bound: far more than any small disk holds
            try:
                written += file.write(block)
            except OSError as error:
                assert error.errno == errno.ENOSPC
                block = block[: len(block) // 2]
                if len(block) < 512:
                    return written
    raise AssertionError("the file system never filled up")


def test_sqlite_disk_full_answers_452_and_recovers_when_space_returns(
    small_disk: Path, server_factory: Any
) -> None:
    server = server_factory(database=f"sqlite:///{small_disk / 'queue.db'}").start()
    try:
        assert send(server, "before")[0] == 250
        filler = small_disk / "filler"
        fill(filler)

        accepted = {"before"}
        # Small messages may still fit in the WAL file's reusable pages; each must be
        # either 250 (and stored) or a 4xx.  The large ones cannot fit anywhere.
        for tag, size in (("full-small", 200), ("full-large", 1 << 20), ("full-larger", 3 << 20)):
            code, text = send(server, tag, size)
            print(f"\ndisk full, {tag} ({size} bytes): {code} {text}")
            if tag == "full-small" and code == 250:
                accepted.add(tag)
            else:
                assert_deferred(code, text, "452 4.3.1")
        assert server.process is not None and server.process.poll() is None

        filler.unlink()
        code, text = send(server, "after", 1 << 20)
        assert code == 250, f"after freeing space: {code} {text!r}"
        accepted.add("after")
        assert queued_tags(server) == accepted
    finally:
        server.stop()


# --------------------------------------------------------------------------- locked


def test_sqlite_locked_longer_than_busy_timeout_answers_451_then_recovers(
    server: ServerProcess,
) -> None:
    database = server.settings["database"].removeprefix("sqlite:///")
    locker = sqlite3.connect(database, isolation_level=None, timeout=BUSY_TIMEOUT)
    try:
        # A lock shorter than the busy timeout only delays the 250.
        locker.execute("BEGIN EXCLUSIVE")
        release = time.monotonic() + 2
        code, text = _send_while(server, "short-lock", lambda: _rollback_at(locker, release))
        assert code == 250, f"{code} {text!r}"

        locker.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        code, text = send(server, "locked", timeout=BUSY_TIMEOUT + 30)
        waited = time.monotonic() - started
        assert_deferred(code, text, "451 4.3.0")
        assert waited >= BUSY_TIMEOUT - 1, f"gave up after {waited:.1f}s, before the busy timeout"
        assert server.process is not None and server.process.poll() is None
    finally:
        if locker.in_transaction:
            locker.execute("ROLLBACK")
        locker.close()

    code, text = send(server, "unlocked")
    assert code == 250, f"after releasing the lock: {code} {text!r}"
    assert queued_tags(server) == {"short-lock", "unlocked"}


def _rollback_at(locker: sqlite3.Connection, when: float) -> None:
    time.sleep(max(when - time.monotonic(), 0))
    locker.execute("ROLLBACK")


def _send_while(server: ServerProcess, tag: str, action: Any) -> tuple[int, str]:
    """Send one message while `action` runs in this thread (the lock holder's)."""
    result: list[tuple[int, str]] = []
    sender = threading.Thread(target=lambda: result.append(send(server, tag)), daemon=True)
    sender.start()
    action()
    sender.join(BUSY_TIMEOUT + 30)
    assert result, "the client got no reply"
    return result[0]


# --------------------------------------------------------------------------- PostgreSQL


def _terminate_backends(admin: psycopg.Connection[Any], database: str) -> None:
    """Cut the server's connections, so that new ones pick up the database's settings."""
    admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid()",
        (database,),
    )


def test_postgresql_read_only_answers_451_then_recovers(
    server_factory: Any, postgres_url: str
) -> None:
    server = server_factory(database=postgres_url).start()
    assert send(server, "before")[0] == 250
    name = postgres_url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        _terminate_backends(admin, name)
        try:
            for attempt in range(2):
                code, text = send(server, f"read-only-{attempt}")
                assert_deferred(code, text, "451 4.3.0")
            assert server.process is not None and server.process.poll() is None
        finally:
            admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
            _terminate_backends(admin, name)
    code, text = send(server, "writable")
    assert code == 250, f"after making the database writable again: {code} {text!r}"
    assert queued_tags(server) == {"before", "writable"}
