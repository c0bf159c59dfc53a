"""Host and port as configuration and routes write them: ``mx1.example.com:25``,
``127.0.0.1:2525``, ``[::1]:25``.  `parse_host_port` raises ValueError naming
the text when it is neither."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass


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
