"""The sd_notify protocol: what `backupmx serve` tells systemd, over a real AF_UNIX datagram socket.

A real ``backupmx serve`` starts with ``$NOTIFY_SOCKET`` pointing at a bound
datagram socket (tests/support/notify_socket.py), as systemd does for
``Type=notify``: READY=1 arrives only once the SMTP port accepts connections,
STATUS= carries the queue size, WATCHDOG=1 comes every ``$WATCHDOG_USEC``/2, a
SIGHUP with a broken file changes nothing, and SIGTERM sends STOPPING=1 before
the drain.  `Notifier` on its own is tested in tests/unit/test_notifier.py.
"""

from __future__ import annotations

import json
import secrets
import signal
import smtplib
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.notify_socket import NotifySocket
from tests.support.ports import free_port
from tests.support.server import DOMAIN, ServerProcess
from tests.support.waiting import wait_for_log


@pytest.fixture
def abstract_socket() -> Iterator[NotifySocket]:
    receiver = NotifySocket(f"@backupmx-test-{secrets.token_hex(6)}")
    yield receiver
    receiver.close()


# --------------------------------------------------------------------------- backupmx serve


def healthz(server: ServerProcess) -> tuple[int, dict[str, Any]]:
    url = f"http://{server.settings['metrics']['listen']}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def notified_server(
    server_factory: Any, receiver: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> ServerProcess:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    server: ServerProcess = server_factory(
        metrics={"listen": f"127.0.0.1:{free_port()}", "status_interval": "1s"}
    )
    server.write_config()
    return server


def start_without_waiting(server: ServerProcess) -> None:
    """Popen only: the test itself watches for READY=1 instead of polling the port."""
    server.process = subprocess.Popen(
        [sys.executable, "-m", "backupmx", "--config", str(server.config_path), "serve"],
        stdout=server.log_path.open("ab"),
        stderr=subprocess.STDOUT,
        cwd=server.directory,
    )


def test_serve_sends_ready_only_once_the_smtp_port_accepts(
    server_factory: Any, abstract_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = notified_server(server_factory, abstract_socket, monkeypatch)
    start_without_waiting(server)
    ready = abstract_socket.wait_for("READY", "1")
    # At the moment READY=1 is read, connecting must already work: no retry loop here.
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        assert client.ehlo("client.test")[0] == 250
    assert f"{server.host}:{server.port}" in ready["STATUS"]
    status, body = healthz(server)
    assert status == 200 and body["status"] == "ok"
    assert server.stop() == 0


def test_serve_reports_queue_status_and_pings_the_watchdog_then_stopping_on_sigterm(
    server_factory: Any, abstract_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = notified_server(server_factory, abstract_socket, monkeypatch)
    start_without_waiting(server)
    abstract_socket.wait_for("READY", "1")
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.sendmail(
            "a@sender.test", [f"one@{DOMAIN}", f"two@{DOMAIN}"], b"Subject: x\r\n\r\nx\r\n"
        )
    # The primary (127.0.0.1:9) refuses: the message stays, and STATUS= says so.
    status = abstract_socket.wait_for("STATUS", "queue: 1 message(s), 2 recipient(s) waiting")
    assert status["STATUS"].startswith("queue: 1 message(s), 2 recipient(s) waiting, 0 held")
    pings = [m for m in abstract_socket.received if m.get("WATCHDOG") == "1"]
    assert pings, "WATCHDOG=1 every WATCHDOG_USEC/2 = 0.5 s"

    server.signal(signal.SIGTERM)
    stopping = abstract_socket.wait_for("STOPPING", "1")
    assert stopping["STATUS"].startswith("draining")
    assert server.stop() == 0
    keys = abstract_socket.assignments()
    assert keys.index("READY") < keys.index("STOPPING")


def test_reload_with_a_broken_config_keeps_serving_and_tells_systemd_nothing_new(
    server_factory: Any, abstract_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = notified_server(server_factory, abstract_socket, monkeypatch)
    start_without_waiting(server)
    abstract_socket.wait_for("READY", "1")
    address = server.settings["metrics"]["listen"]
    server.settings["metrics"]["listen"] = "not an address"
    server.write_config()
    server.signal(signal.SIGHUP)
    wait_for_log(server, "reload_refused", timeout=15)
    assert "metrics.listen" in server.log()
    assert server.process is not None and server.process.poll() is None
    server.settings["metrics"]["listen"] = address  # what the running server still uses
    status, body = healthz(server)
    assert status == 200 and body["listener"]["bound"]
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.sendmail("a@sender.test", [f"kept@{DOMAIN}"], b"Subject: x\r\n\r\nx\r\n")
    abstract_socket.drain()
    assert abstract_socket.assignments().count("READY") == 1
    assert "STOPPING" not in abstract_socket.assignments()
    assert server.stop() == 0


def test_sigterm_right_after_ready_exits_promptly_every_time(
    server_factory: Any, abstract_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start-up jobs (probes, housekeeping, STATUS=) are mid-query when READY=1 goes
    out; a stop then must let them finish, not leave a task asyncio.run waits for forever."""
    server = notified_server(server_factory, abstract_socket, monkeypatch)
    for _ in range(5):
        abstract_socket.received.clear()
        start_without_waiting(server)
        abstract_socket.wait_for("READY", "1")
        server.signal(signal.SIGTERM)
        assert server.stop(timeout=15) == 0, server.log()
