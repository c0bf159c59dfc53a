"""Client networks as configuration lists them (``192.0.2.0/24``, ``::1``), and the
one test of an IP against them.  A text that is not an IP address is in no
network; `parse_networks` raises ValueError for an entry that is not a network."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def parse_networks(texts: Iterable[str]) -> Networks:
    """Host bits set are allowed (``192.0.2.1/24`` is ``192.0.2.0/24``), as Postfix's mynetworks."""
    return tuple(ipaddress.ip_network(text, strict=False) for text in texts)


def in_networks(client_ip: str, networks: Networks) -> bool:
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    return any(address in network for network in networks)
