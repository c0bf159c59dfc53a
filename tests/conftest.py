"""Fixtures shared by the suite: a real `backupmx serve` process, and real databases.

`ServerProcess` starts ``python -m backupmx --config FILE serve`` on a free
loopback port, waits until it accepts connections, and stops it (SIGTERM, or
SIGKILL for the crash tests).  Tests talk to it with real clients (smtplib,
swaks, smtp-source) and inspect the queue through the real CLI.

`database_url` gives each test a fresh queue database: SQLite in the test's
temporary directory, and PostgreSQL at 127.0.0.1:5432 (a new database per test,
dropped afterwards) for tests parametrized over both backends.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, settings

from backupmx.queue.database import upgrade
from backupmx.queue.store import Store

if TYPE_CHECKING:
    from spam_filters import Spamd

POSTGRES_ADMIN_URL = os.environ.get(
    "BACKUPMX_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
DOMAIN = "example.test"


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_config(path: Path, settings: dict[str, Any]) -> Path:
    """Write a backupmx TOML file: plain keys, [tables] and [[domain]] lists."""
    lines: list[str] = []
    tables: list[str] = []
    for key, value in settings.items():
        if isinstance(value, dict):
            tables.append(f"\n[{key}]")
            tables += [f"{k} = {toml_value(v)}" for k, v in value.items()]
        elif key == "domain":
            for domain in value:
                tables.append("\n[[domain]]")
                tables += [f"{k} = {toml_value(v)}" for k, v in domain.items()]
        else:
            lines.append(f"{key} = {toml_value(value)}")
    path.write_text("\n".join(lines + tables) + "\n")
    return path


class ServerProcess:
    """One `backupmx serve` process with its own config file and database."""

    def __init__(self, directory: Path, **settings: Any) -> None:
        self.directory = directory
        self.host = "127.0.0.1"
        self.port = free_port()
        self.settings: dict[str, Any] = {
            "hostname": "mx2.backup.test",
            "listen": [f"{self.host}:{self.port}"],
            "database": f"sqlite:///{directory / 'queue.db'}",
            "domain": [{"name": DOMAIN, "primary": ["127.0.0.1:9"]}],
        }
        self.settings.update(settings)
        self.config_path = directory / "backupmx.toml"
        self.log_path = directory / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        write_config(self.config_path, self.settings)

    def start(self, *command: str) -> ServerProcess:
        """`backupmx --config FILE serve`, or with `command` instead of ``serve``."""
        self.write_config()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "backupmx",
                "--config",
                str(self.config_path),
                *(command or ("serve",)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
        )
        try:
            wait_for_port(self.host, self.port)
        except TimeoutError:
            self.process.kill()
            raise RuntimeError(f"backupmx did not start:\n{self.log()}") from None
        return self

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        self.process = None
        return status

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "backupmx", "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.directory,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"backupmx {' '.join(args)} failed: {result.stderr}")
        return result

    def queue(self, *extra: str) -> list[dict[str, Any]]:
        """`queue list --json --all`, parsed."""
        return list(json.loads(self.cli("queue", "list", "--json", "--all", *extra).stdout))

    def raw(self, queue_id: str) -> bytes:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "backupmx",
                "--config",
                str(self.config_path),
                "queue",
                "show",
                queue_id,
                "--raw",
            ],
            capture_output=True,
            timeout=60,
            check=True,
        )
        return result.stdout


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
    from spam_filters import Spamd  # it imports this module's free_port

    server = Spamd(tmp_path_factory.mktemp("spamd")).start()
    try:
        yield server
    finally:
        server.stop()


def server_examples(count: int) -> settings:
    """Hypothesis settings for `count` examples run against a real server: no deadline
    (a session takes milliseconds or seconds), derandomized so that a run is repeatable,
    no example database, and the health checks a server fixture trips suppressed."""
    return settings(
        max_examples=count,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
