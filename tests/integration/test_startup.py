"""Every start-up failure of `serve` is one line naming the key or the file, exit 2
(the configuration) or 1 (the machine), never a traceback; `config check` finds each
of them first.  Real processes, real sockets, a real PostgreSQL port with nothing on it.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.ports import free_port
from tests.support.server import ServerProcess, write_config


def backupmx(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backupmx", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def settings(tmp_path: Path, **changes: Any) -> Path:
    values: dict[str, Any] = {
        "hostname": "mx2.backup.test",
        "listen": [f"127.0.0.1:{free_port()}"],
        "database": f"sqlite:///{tmp_path / 'queue.db'}",
        "domain": [{"name": "example.test", "primary": ["127.0.0.1:9"]}],
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
    }
    values.update(changes)
    return write_config(tmp_path / "backupmx.toml", values)


def fails_in_one_line(config: Path, status: int, *named: str) -> None:
    """`serve` exits with `status` and one line naming each of `named`; `config check`
    reports the same and exits the same."""
    served = backupmx("--config", str(config), "serve")
    assert served.returncode == status, served.stderr
    assert "Traceback" not in served.stderr + served.stdout
    (line,) = served.stderr.splitlines()
    assert line.startswith("backupmx: cannot start: "), line
    for name in named:
        assert name in line, line
    checked = backupmx("--config", str(config), "config", "check", "--json")
    assert checked.returncode == status, checked.stdout + checked.stderr
    report = json.loads(checked.stdout)
    assert report["ok"] is False
    assert any(all(n in f"{p['key']}: {p['problem']}" for n in named) for p in report["problems"])


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    """A port some other program holds."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    yield holder
    holder.close()


def test_missing_certificate_names_the_key_and_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    config = settings(tmp_path, tls={"cert": str(missing), "key": str(missing)})
    served = backupmx("--config", str(config), "serve")
    assert served.returncode == 1 and "Traceback" not in served.stderr
    lines = served.stderr.splitlines()
    assert lines == [
        f"backupmx: cannot start: tls.cert: {missing}: No such file or directory",
        f"backupmx: cannot start: tls.key: {missing}: No such file or directory",
    ]
    fails_in_one_line(
        settings(tmp_path, tls={"cert": str(missing), "key": __file__}), 1, "tls.cert", str(missing)
    )


def test_a_file_that_is_not_a_certificate_is_refused(tmp_path: Path) -> None:
    config = settings(tmp_path, tls={"cert": __file__, "key": __file__})
    fails_in_one_line(config, 2, "tls.cert", "not a certificate")


def test_an_address_this_host_cannot_have(tmp_path: Path) -> None:
    fails_in_one_line(settings(tmp_path, listen=["300.1.1.1:2525"]), 2, "listen[0]", "300.1.1.1")


def test_a_port_in_use(tmp_path: Path, listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    config = settings(tmp_path, listen=[f"127.0.0.1:{port}"])
    fails_in_one_line(config, 1, "listen[0]", f"127.0.0.1:{port}", "address already in use")


def test_a_metrics_port_in_use(tmp_path: Path, listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    config = settings(tmp_path, metrics={"listen": f"127.0.0.1:{port}"})
    fails_in_one_line(config, 1, "metrics.listen", "address already in use")


def test_a_database_that_does_not_answer(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://backupmx@127.0.0.1:{free_port()}/backupmx"
    config = settings(tmp_path, database=url, control_socket=str(tmp_path / "control.sock"))
    fails_in_one_line(config, 1, "database", "unreachable")


def test_a_schema_newer_than_this_version(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path)
    server.start()
    server.stop()
    with sqlite3.connect(tmp_path / "queue.db") as db:
        db.execute("UPDATE alembic_version SET version_num = '9999_future'")
    config = settings(tmp_path)
    checked = backupmx("--config", str(config), "config", "check")
    assert checked.returncode == 1
    assert "error: database: schema revision 9999_future is newer" in checked.stdout


def test_config_check_approves_what_serve_runs_and_warns_of_no_domain(tmp_path: Path) -> None:
    config = settings(tmp_path)
    checked = backupmx("--config", str(config), "config", "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert ": ok (1 domain(s)" in checked.stdout
    assert "serve creates it" in checked.stdout  # the SQLite file does not exist yet
    bare = backupmx("--config", str(settings(tmp_path, domain=[])), "config", "check")
    assert bare.returncode == 0
    assert "warning: no [[domain]]" in bare.stdout


def test_config_check_beside_a_running_server(tmp_path: Path) -> None:
    """The ports a running serve holds are its own: `config check` before a reload
    does not call them "in use"."""
    server = ServerProcess(tmp_path).start()
    try:
        checked = backupmx("--config", str(server.config_path), "config", "check")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "note: serve is running" in checked.stdout
    finally:
        server.stop()
