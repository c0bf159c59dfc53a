"""Host and port as configuration and routes write them: ``mx1.example.com:25``,
``127.0.0.1:2525``, ``[::1]:25``.  `parse_host_port` raises ValueError naming
the text when it is neither; `listening_socket` binds one such address."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(text: str, default_port: int | None = None) -> HostPort:
    """ "127.0.0.1:25", "[::1]:25", "mx1.example.com" (with a default port)."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]\s]+)(?::(\d+))?", text)
    if not match:
        raise ValueError(f"{text!r} is not host:port (IPv6 as [::1]:25)")
    host = match.group(1) or match.group(3)
    port_text = match.group(2) or match.group(4)
    if match.group(1):
        ipaddress.IPv6Address(host)
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{text!r} has no port")
        return HostPort(host, default_port)
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return HostPort(host, port)


def listening_socket(family: int, sockaddr: tuple[Any, ...]) -> socket.socket:
    """A TCP socket bound to `sockaddr` (IPv6 sockets take IPv6 only, so that "[::]:25"
    and "0.0.0.0:25" are two sockets), not yet listening; raises OSError."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    return sock
