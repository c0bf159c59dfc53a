"""A real `backupmx serve` process, and the config files it reads.

`ServerProcess` starts ``python -m backupmx --config FILE serve`` on a free
loopback port, waits until it accepts connections, and stops it (SIGTERM, or
SIGKILL for the crash tests).  Tests talk to it with real clients (smtplib,
swaks, smtp-source) and inspect the queue through the real CLI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

from hypothesis import HealthCheck, settings

from tests.support.ports import free_port
from tests.support.waiting import ProcessExited, wait_for_process_port

POSTGRES_ADMIN_URL = os.environ.get(
    "BACKUPMX_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
DOMAIN = "example.test"


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
            # Its own metrics port: one taken stops `serve` from starting.
            "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        }
        self.settings.update(settings)
        self.config_path = directory / "backupmx.toml"
        self.log_path = directory / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        settings = dict(self.settings)
        if not str(settings["database"]).startswith("sqlite"):
            # The default control socket of a PostgreSQL queue is one per machine
            # (/run/backupmx/control.sock); an SQLite queue's is beside its file.
            settings.setdefault("control_socket", str(self.directory / "control.sock"))
        write_config(self.config_path, settings)

    def start(self, *command: str, pipe: bool = False) -> ServerProcess:
        """`backupmx --config FILE serve`, or with `command` instead of ``serve``.  Its
        stdout and stderr go to the log file; with `pipe`, through a pipe (as to
        journald) that a thread copies to the log file."""
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
            stdout=subprocess.PIPE if pipe else log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
        )
        if pipe:
            assert self.process.stdout is not None
            threading.Thread(target=_copy, args=(self.process.stdout, log), daemon=True).start()
        try:
            wait_for_process_port(self.process, self.host, self.port, timeout=15)
        except (ProcessExited, TimeoutError):
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

    def wait_for_exit(self, timeout: float) -> int:
        """Wait for the process to exit by itself (stop() would signal it again)."""
        assert self.process is not None
        self.process.wait(timeout)
        return self.stop()

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


def _copy(source: IO[bytes], log: IO[bytes]) -> None:
    """Copy what comes through the pipe to the log, as it comes, until the process ends."""
    with source, log:
        while chunk := os.read(source.fileno(), 1 << 16):
            log.write(chunk)
            log.flush()


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
