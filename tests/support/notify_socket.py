"""The service manager's end of sd_notify(3): a bound AF_UNIX datagram socket.

`NotifySocket` binds what systemd would give a ``Type=notify`` service in
``$NOTIFY_SOCKET`` (a path, or an abstract-namespace name written ``@name``) and
keeps every datagram read from it as a dict of its ``KEY=VALUE`` assignments.
"""

from __future__ import annotations

import socket
import time


class NotifySocket:
    """The service manager's end: a bound datagram socket and what arrived on it."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.received: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str = "", timeout: float = 20) -> dict[str, str]:
        """The first datagram (already read or arriving within `timeout`) that sets `key`
        to a value starting with `value`."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for message in self.received[seen:]:
                if key in message and message[key].startswith(value):
                    return message
            seen = len(self.received)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {key}={value}… within {timeout}s: {self.received}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.received.append(dict(line.split("=", 1) for line in data.decode().split("\n")))

    def drain(self) -> None:
        """Read whatever is waiting, without blocking."""
        self.sock.setblocking(False)
        try:
            while True:
                data = self.sock.recv(4096)
                self.received.append(dict(line.split("=", 1) for line in data.decode().split("\n")))
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)

    def assignments(self) -> list[str]:
        return [key for message in self.received for key in message]

    def close(self) -> None:
        self.sock.close()
