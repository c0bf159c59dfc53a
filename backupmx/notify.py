"""The service manager's notification protocol (sd_notify(3)), stdlib only.

systemd gives a ``Type=notify`` service the address of an ``AF_UNIX`` datagram
socket in ``$NOTIFY_SOCKET``: a path, or an abstract-namespace name written with a
leading ``@``.  Each datagram is newline-separated ``KEY=VALUE`` assignments:
``READY=1`` once the service is up, ``STOPPING=1`` when it begins to shut down,
``STATUS=…`` as a one-line description for ``systemctl status``, and
``WATCHDOG=1`` at least every ``$WATCHDOG_USEC`` microseconds when the unit has
``WatchdogSec=`` (systemd then restarts a service that stops pinging).

Promises: without ``$NOTIFY_SOCKET`` every call does nothing; a send never
blocks and never raises — the manager being gone or slow must not stop mail —
it logs the error once and goes on.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("backupmx")


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """$NOTIFY_SOCKET, and $WATCHDOG_USEC if $WATCHDOG_PID is unset or names us."""
        address = environ.get("NOTIFY_SOCKET") or None
        watchdog: int | None = None
        pid = environ.get("WATCHDOG_PID")
        if environ.get("WATCHDOG_USEC", "").isdigit() and (pid is None or pid == str(os.getpid())):
            watchdog = int(environ["WATCHDOG_USEC"]) or None
        return cls(address, watchdog)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the manager's timeout, as sd_watchdog_enabled(3)
        advises; None when the unit has no WatchdogSec=."""
        if self.address is None or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status)

    def stopping(self, status: str) -> None:
        self.send(STOPPING="1", STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def watchdog(self) -> None:
        self.send(WATCHDOG="1")

    async def run_watchdog(self) -> None:
        """WATCHDOG=1 every `watchdog_interval`, from the event loop: a stuck loop stops them."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    def send(self, **fields: str) -> None:
        if self.address is None:
            return
        # A newline inside a value would start a new assignment.
        text = "\n".join(f"{key}={' '.join(value.split())}" for key, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                self._socket.setblocking(False)
            self._socket.sendto(text.encode(), _socket_address(self.address))
        except OSError as error:
            if not self._failed:
                log.warning("notify_failed", socket=self.address, error=str(error))
            self._failed = True
            return
        self._failed = False

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _socket_address(address: str) -> str | bytes:
    """'@name' is the abstract name '\\0name' (unix(7)); anything else a path."""
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    return address
