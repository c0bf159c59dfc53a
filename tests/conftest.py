"""Fixtures shared by the suite: real `backupmx serve` processes, real databases, spamd.

Everything under tests/integration/ is marked ``integration`` here (it starts
programs or opens sockets); tests/unit/ runs without either, in seconds.

`database_url` gives each test a fresh queue database: SQLite in the test's
temporary directory, and PostgreSQL at 127.0.0.1:5432 (a new database per test,
dropped afterwards) for tests parametrized over both backends.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from backupmx.queue.database import upgrade
from backupmx.queue.store import Store
from tests.support.server import POSTGRES_ADMIN_URL, ServerProcess
from tests.support.spam_filters import Spamd

INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[ServerProcess] = []

    def make(**settings: Any) -> ServerProcess:
        directory = tmp_path / f"server{len(started)}"
        directory.mkdir()
        server = ServerProcess(directory, **settings)
        started.append(server)
        return server

    yield make
    for server in started:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait()


@pytest.fixture
def server(server_factory: Any) -> ServerProcess:
    """backupmx backing up example.test on a loopback port, SQLite queue."""
    result: ServerProcess = server_factory().start()
    return result


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    import psycopg

    name = f"backupmx_test_{secrets.token_hex(4)}"
    admin = POSTGRES_ADMIN_URL
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    """A migrated, started queue store on SQLite and on PostgreSQL."""
    opened = Store.open(database_url)
    await upgrade(opened.engine)
    await opened.start()
    yield opened
    await opened.close()


@pytest.fixture(scope="module")
def spamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spamd]:
    """SpamAssassin's real spamd on a loopback port, for a module's spam-hook tests."""
    server = Spamd(tmp_path_factory.mktemp("spamd")).start()
    try:
        yield server
    finally:
        server.stop()
