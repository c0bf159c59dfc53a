"""The one set of wait helpers: poll for what a real process will do, with a deadline.

Each helper fails with a message that names what never came, so that a slow
machine gives a readable failure rather than a bare timeout.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


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


def wait_for_port(host: str, port: int, timeout: float = 15.0) -> None:
    """Wait until something accepts connections on host:port (TimeoutError if not)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


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
