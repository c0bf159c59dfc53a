"""The one set of wait helpers: poll for what a real process will do, with a deadline.

Each helper fails with a message that names what never came, so that a slow
machine gives a readable failure rather than a bare timeout.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class ProcessExited(RuntimeError):
    """The process a wait was for exited before what was waited for came."""


class Logging(Protocol):
    def log(self) -> str: ...


class Queueing(Protocol):
    def queue(self, *extra: str) -> list[dict[str, Any]]: ...


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll `check` until it returns something true and return that; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    value = check()
    while not value:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}: {value!r}")
        time.sleep(interval)
        value = check()
    return value


def port_open(host: str, port: int) -> bool:
    """Whether something accepts a connection on host:port right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_while_running(
    process: subprocess.Popen[Any],
    check: Callable[[], T],
    timeout: float,
    what: str,
    interval: float = 0.1,
) -> T:
    """Poll `check` until it returns something true and return that, for as long as
    `process` runs: ProcessExited as soon as it has exited, TimeoutError after `timeout`.

    For waiting on a process that is starting up: one that died says so at once
    instead of after the whole timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise ProcessExited(f"exited with status {process.returncode} before {what}")
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def wait_for_process_port(
    process: subprocess.Popen[Any], host: str, port: int, timeout: float, interval: float = 0.05
) -> None:
    """Wait until `process` accepts connections on host:port (see `wait_while_running`)."""
    wait_while_running(
        process, lambda: port_open(host, port), timeout, f"a listener on {host}:{port}", interval
    )


def wait_for_success(
    action: Callable[[], T],
    timeout: float,
    what: str,
    errors: tuple[type[BaseException], ...] = (OSError,),
    interval: float = 0.1,
) -> T:
    """Call `action` until it no longer raises one of `errors`; return what it returns.

    After `timeout`, fails (AssertionError) naming `what` and the last error.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except errors as error:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:g} s waiting for {what}: {error!r}"
                ) from error
        time.sleep(interval)


def logged(server: Logging, event: str) -> list[str]:
    """The JSON log lines of `event`, in order."""
    return [line for line in server.log().splitlines() if f'"event": "{event}"' in line]


def wait_for_log(server: Logging, event: str, count: int = 1, timeout: float = 10) -> str:
    """Wait until the log holds `count` lines of `event`; return the last of them."""
    deadline = time.monotonic() + timeout
    while True:
        lines = logged(server, event)
        if len(lines) >= count:
            return lines[count - 1]
        assert time.monotonic() < deadline, f"no {event!r} in the log:\n{server.log()[-2000:]}"
        time.sleep(0.05)


def wait_for_state(server: Queueing, wanted: str, timeout: float = 15) -> dict[str, Any]:
    """Wait until the only recipient in the queue is in state `wanted`; return it."""

    def recipient() -> dict[str, Any] | None:
        (message,) = server.queue()
        found: dict[str, Any] = message["recipients"][0]
        return found if found["state"] == wanted else None

    found = wait_for(recipient, timeout, f"the recipient to become {wanted}", interval=0.3)
    return found
