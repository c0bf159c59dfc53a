"""The PROXY protocol, versions 1 and 2 (HAProxy's proxy-protocol.txt), for a load balancer.

Only connections from the configured ``proxy_protocol`` networks are read this
way, and from them the header is required (as Postfix's
``smtpd_upstream_proxy_protocol``): anyone else who sends ``PROXY …`` is just a
client sending a bad command, and cannot choose the address we see.

`read_header` returns the real client's address, or None for a ``LOCAL`` (v2) or
``UNKNOWN`` (v1) header — the balancer's own health check — in which case the
balancer's address stands.  A malformed header raises `ProxyError`.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Protocol

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX_PAYLOAD = 4096  # addresses plus TLVs; far more than a balancer sends


class Input(Protocol):
    """Where the header is read from (an `asyncio.StreamReader` will do)."""

    async def readexactly(self, n: int) -> bytes: ...


class ProxyError(ValueError):
    """Not a valid PROXY header."""


def parse_v1(line: bytes) -> str | None:
    """``PROXY TCP4 192.0.2.1 198.51.100.1 56324 25\\r\\n`` -> "192.0.2.1"."""
    if not line.endswith(b"\r\n") or len(line) > V1_MAX:
        raise ProxyError("PROXY v1 line too long or not ended by CRLF")
    fields = line[:-2].decode("ascii", "replace").split(" ")
    if fields[:2] == ["PROXY", "UNKNOWN"]:
        return None
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyError(f"bad PROXY v1 line: {line[:60]!r}")
    _, family, source, destination, source_port, destination_port = fields
    version = 4 if family == "TCP4" else 6
    try:
        for text in (source, destination):
            if ipaddress.ip_address(text).version != version:
                raise ProxyError(f"PROXY v1: {text} is not {family}")
        for port in (source_port, destination_port):
            if not port.isdigit() or not 0 <= int(port) < 65536:
                raise ProxyError(f"PROXY v1: bad port {port!r}")
    except ValueError as error:
        raise ProxyError(str(error)) from error
    return str(ipaddress.ip_address(source))


def parse_v2(header: bytes, payload: bytes) -> str | None:
    """The 16-byte v2 header (signature included) and its payload -> the source address."""
    version_command, family = header[12], header[13]
    if version_command >> 4 != 2:
        raise ProxyError("PROXY v2: unknown version")
    command = version_command & 0x0F
    if command == 0:  # LOCAL: the balancer speaking for itself
        return None
    if command != 1:
        raise ProxyError("PROXY v2: unknown command")
    address_family, transport = family >> 4, family & 0x0F
    if transport != 1:
        raise ProxyError("PROXY v2: not a stream connection")
    if address_family == 1 and len(payload) >= 12:
        return str(ipaddress.IPv4Address(payload[:4]))
    if address_family == 2 and len(payload) >= 36:
        return str(ipaddress.IPv6Address(payload[:16]))
    if address_family == 0:  # UNSPEC
        return None
    raise ProxyError("PROXY v2: unsupported address family or short payload")


async def read_header(reader: Input) -> str | None:
    """Read one v1 or v2 header from the start of the connection."""
    start = await reader.readexactly(12)
    if start == V2_SIGNATURE:
        rest = await reader.readexactly(4)
        (length,) = struct.unpack("!H", rest[2:4])
        if length > V2_MAX_PAYLOAD:
            raise ProxyError("PROXY v2: payload too long")
        payload = await reader.readexactly(length)
        return parse_v2(start + rest, payload)
    if not start.startswith(V1_PREFIX):
        raise ProxyError("no PROXY header")
    line = bytearray(start)
    while not line.endswith(b"\r\n"):
        if len(line) >= V1_MAX:
            raise ProxyError("PROXY v1 line too long")
        line += await reader.readexactly(1)
    return parse_v1(bytes(line))
