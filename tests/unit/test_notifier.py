"""The sd_notify protocol's sending end, `Notifier`, without a server.

Each test binds a datagram socket (a path, or an abstract-namespace name given
as ``@name``; tests/support/notify_socket.py) and reads what `Notifier` sends:
READY=1 and STATUS= in one datagram, no assignment injected by a newline,
nothing sent and nothing raised without ``$NOTIFY_SOCKET``, a manager that is
gone logged once, and the watchdog interval from ``$WATCHDOG_USEC``.  What a
real ``backupmx serve`` sends is in tests/integration/test_notify.py.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from backupmx.notify import Notifier
from tests.support.notify_socket import NotifySocket


@pytest.fixture
def abstract_socket() -> Iterator[NotifySocket]:
    receiver = NotifySocket(f"@backupmx-test-{secrets.token_hex(6)}")
    yield receiver
    receiver.close()


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket(str(tmp_path / "notify"))
    yield receiver
    receiver.close()


# --------------------------------------------------------------------------- Notifier


def test_notifier_sends_ready_and_status_in_one_datagram(path_socket: NotifySocket) -> None:
    notifier = Notifier(path_socket.address)
    notifier.ready("accepting mail")
    assert path_socket.wait_for("READY") == {"READY": "1", "STATUS": "accepting mail"}
    notifier.close()


def test_notifier_reaches_an_abstract_namespace_socket(abstract_socket: NotifySocket) -> None:
    notifier = Notifier(abstract_socket.address)
    notifier.stopping("draining")
    assert abstract_socket.wait_for("STOPPING") == {"STOPPING": "1", "STATUS": "draining"}
    notifier.close()


def test_a_newline_in_a_status_cannot_inject_an_assignment(path_socket: NotifySocket) -> None:
    notifier = Notifier(path_socket.address)
    notifier.status("database down\nREADY=1")
    assert path_socket.wait_for("STATUS") == {"STATUS": "database down READY=1"}
    notifier.close()


def test_without_notify_socket_nothing_is_sent_and_nothing_fails() -> None:
    notifier = Notifier.from_environment({})
    assert notifier.address is None and notifier.watchdog_interval is None
    notifier.ready("x")
    notifier.watchdog()


def test_a_vanished_manager_socket_is_logged_not_raised(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone"))
    with capture_logs() as logs:
        notifier.ready("x")
        notifier.status("y")
    notifier.close()
    # Logged once, not once per send.
    assert [entry["event"] for entry in logs] == ["notify_failed"], logs
    assert logs[0]["socket"] == str(tmp_path / "gone")
    assert logs[0]["log_level"] == "warning"


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_our_pid() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000"}
    assert Notifier.from_environment(env).watchdog_interval == 1.5
    mine = {**env, "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environment(mine).watchdog_interval == 1.5
    other = {**env, "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_environment(other).watchdog_interval is None
    assert Notifier.from_environment({"WATCHDOG_USEC": "3000000"}).watchdog_interval is None
