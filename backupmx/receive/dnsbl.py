"""DNS blocklists: the client's address looked up in the configured zones (RFC 5782).

Lookups for all zones start when the client connects, in parallel with the
greeting, so a well-behaved client waits for none of them; the first RCPT takes
whatever has come back by then, each zone bounded by ``dnsbl.timeout``.  A zone
that times out or fails counts as not listing the client (fail open: a dead
blocklist must not stop mail).  Weights of the zones that list the client add up
(as postscreen's ``postscreen_dnsbl_sites``); at ``dnsbl.threshold`` the client is
refused at RCPT with ``550 5.7.1``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from backupmx.config import Dnsbl, DnsblZone
from backupmx.mail import replies
from backupmx.resolver import AddressAnswer, Addresses

log = structlog.get_logger("backupmx.receive")

# Spamhaus and others answer 127.255.255.x for errors (query refused, over quota):
# not a listing.
_ERROR_ANSWERS = ipaddress.ip_network("127.255.255.0/24")
_LISTED = ipaddress.ip_network("127.0.0.0/8")

Lookup = Callable[[str], Awaitable[AddressAnswer]]


@dataclass(frozen=True)
class Listing:
    score: float
    zones: tuple[str, ...]  # the zones that list the client

    def refusal(self, client_ip: str, threshold: float) -> str | None:
        if not self.zones or self.score < threshold:
            return None
        return replies.blocklisted(client_ip, self.zones[0])


def query_name(client_ip: str, zone: str) -> str:
    """192.0.2.1 -> 1.2.0.192.zone; IPv6 by reversed nibbles (RFC 5782 §2.4)."""
    address = ipaddress.ip_address(client_ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if isinstance(address, ipaddress.IPv4Address):
        labels = reversed(str(address).split("."))
    else:
        labels = reversed(address.exploded.replace(":", ""))
    return ".".join(labels) + "." + zone


def listed(answer: AddressAnswer, zone: DnsblZone) -> bool:
    if not isinstance(answer, Addresses):
        return False
    for text in answer.addresses:
        address = ipaddress.ip_address(text)
        if not isinstance(address, ipaddress.IPv4Address):
            continue
        if zone.answers:
            if text in zone.answers:
                return True
        elif address in _LISTED and address not in _ERROR_ANSWERS:
            return True
    return False


class Lookups:
    """The zones asked about one client, each answering in the background on its own.

    `listing` waits for the zones still out until ``timeout`` after the start, then
    adds up the zones that answered "listed"; a zone late by then counts as not
    listing, without hiding what the others said.
    """

    def __init__(self, client_ip: str, settings: Dnsbl, lookup: Lookup) -> None:
        self.client_ip = client_ip
        self.settings = settings
        self.started = time.monotonic()
        self._result: Listing | None = None
        loop = asyncio.get_running_loop()
        try:
            names = [query_name(client_ip, zone.name) for zone in settings.zone]
        except ValueError:
            names = []
        self._tasks = [
            (zone, loop.create_task(self._ask(lookup, name)))
            for zone, name in zip(settings.zone, names, strict=False)
        ]

    async def _ask(self, lookup: Lookup, name: str) -> AddressAnswer | None:
        try:
            return await asyncio.wait_for(lookup(name), self.settings.timeout)
        except TimeoutError:
            log.info("dnsbl_timeout", query=name)
            return None

    async def listing(self) -> Listing:
        if self._result is not None:
            return self._result
        pending = [task for _, task in self._tasks if not task.done()]
        remaining = self.settings.timeout - (time.monotonic() - self.started)
        if pending and remaining > 0:
            await asyncio.wait(pending, timeout=remaining)
        zones = [
            zone
            for zone, task in self._tasks
            if task.done()
            and not task.cancelled()
            and task.exception() is None
            and (answer := task.result()) is not None
            and listed(answer, zone)
        ]
        result = Listing(sum(z.weight for z in zones), tuple(z.name for z in zones))
        if zones:
            log.info("dnsbl_listed", client=self.client_ip, zones=result.zones, score=result.score)
        self._result = result
        return result

    def cancel(self) -> None:
        for _, task in self._tasks:
            task.cancel()
