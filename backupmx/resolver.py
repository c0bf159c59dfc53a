"""DNS lookups for delivery: a domain's MX set and a host's addresses (dnspython, asyncio).

Owns the mapping from DNS outcomes to the five answers routing needs; every
lookup returns one of them and never raises for a DNS outcome:

* `MxRecords` / `Addresses` — records found (host names lower-case, no trailing dot);
* `NullMx` — the domain publishes RFC 7505's single ``MX 0 .``: it takes no mail;
* `NoData` — the name exists but has no record of the type (for MX: the caller
  falls back to the domain's A/AAAA, RFC 5321 §5.1 "implicit MX");
* `NxDomain` — the name does not exist (permanent);
* `TempFail` — SERVFAIL, REFUSED, timeout, no nameserver configured or reachable
  (retry later; never a reason to bounce).

Every lookup is bounded by ``timeout`` seconds in total (the resolver's
lifetime).  There is no cache here: callers keep routes for a short while
(``deliver.primaries``), and a local caching resolver does the rest.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX
from dns.resolver import NoNameservers

from backupmx.mail.hosts import HostPort

# dnspython's default wait for one server before trying the next; the whole lookup
# is still bounded by the configured timeout.
ATTEMPT_TIMEOUT = 2.0


@dataclass(frozen=True)
class MxRecord:
    preference: int
    host: str  # lower-case, trailing dot removed; "" for the root name "."


@dataclass(frozen=True)
class MxRecords:
    records: tuple[MxRecord, ...]  # as received; routing sorts and shuffles


@dataclass(frozen=True)
class NullMx:
    """RFC 7505: the domain's only MX is ``0 .`` — it accepts no mail."""


@dataclass(frozen=True)
class Addresses:
    addresses: tuple[str, ...]  # IPv6 first, then IPv4 (RFC 6724's default order)


@dataclass(frozen=True)
class NoData:
    """The name exists but has no record of the asked type (NOERROR, empty answer)."""


@dataclass(frozen=True)
class NxDomain:
    """The name does not exist (RCODE 3); permanent."""


@dataclass(frozen=True)
class TempFail:
    reason: str  # "SERVFAIL", "timed out after 5s", …: for last_error and logs


MxAnswer = MxRecords | NullMx | NoData | NxDomain | TempFail
AddressAnswer = Addresses | NoData | NxDomain | TempFail


class Resolver:
    """Asynchronous MX and address lookups against the configured nameservers.

    ``nameservers`` empty means the system resolver (``/etc/resolv.conf``); a
    missing or empty resolv.conf makes every lookup a `TempFail`, not an error at
    start-up.  Nameservers must be IP addresses (``127.0.0.1:5353``, ``[::1]:53``);
    a name raises ValueError.
    """

    def __init__(self, nameservers: Sequence[HostPort], timeout: float) -> None:
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            servers: list[str | dns.nameserver.Nameserver] = []
            for server in nameservers:
                ipaddress.ip_address(server.host)  # ValueError for a host name
                servers.append(dns.nameserver.Do53Nameserver(server.host, server.port))
            self._resolver.nameservers = servers
        else:
            try:
                self._resolver = dns.asyncresolver.Resolver(configure=True)
            except dns.resolver.NoResolverConfiguration:
                self._resolver = dns.asyncresolver.Resolver(configure=False)
                self._resolver.nameservers = []
        self.timeout = timeout
        self._resolver.lifetime = timeout
        self._resolver.timeout = min(timeout, ATTEMPT_TIMEOUT)
        self._resolver.cache = None

    async def mx(self, domain: str) -> MxAnswer:
        """The MX set of ``domain`` (an A-label name, with or without trailing dot)."""
        answer = await self._query(domain, dns.rdatatype.MX)
        if not isinstance(answer, list):
            return answer
        records = tuple(
            MxRecord(rdata.preference, _host(rdata.exchange))
            for rdata in answer
            if isinstance(rdata, MX)
        )
        if len(records) == 1 and records[0].host == "":
            return NullMx()
        return MxRecords(records) if records else NoData()

    async def addresses(self, host: str) -> AddressAnswer:
        """A and AAAA of ``host`` (asked at once, CNAMEs followed); IPv6 listed first.

        One family's answer is enough: a tempfail or NODATA for the other is
        ignored when the first found addresses.
        """
        six, four = await asyncio.gather(
            self._query(host, dns.rdatatype.AAAA), self._query(host, dns.rdatatype.A)
        )
        found: list[str] = []
        for answer in (six, four):
            if isinstance(answer, list):
                found += [a for a in (rdata.to_text() for rdata in answer) if a not in found]
        if found:
            return Addresses(tuple(found))
        for kind in (NxDomain, TempFail, NoData):
            for answer in (six, four):
                if isinstance(answer, kind):
                    return answer
        return NoData()  # both answers held only records of other types

    async def _query(
        self, name: str, rdtype: dns.rdatatype.RdataType
    ) -> list[dns.rdata.Rdata] | NoData | NxDomain | TempFail:
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException:
            return NxDomain()  # "a..b", a label over 63 octets: a name that cannot exist
        if not self._resolver.nameservers:
            return TempFail("no nameserver configured")
        try:
            answer = await self._resolver.resolve(qname, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return NxDomain()
        except dns.resolver.LifetimeTimeout:
            return TempFail(f"{dns.rdatatype.to_text(rdtype)} lookup of {name} timed out")
        except NoNameservers as error:
            return TempFail(_nameserver_errors(name, rdtype, error))
        except dns.exception.DNSException as error:  # YXDOMAIN, malformed answers, …
            return TempFail(f"{dns.rdatatype.to_text(rdtype)} lookup of {name}: {error}")
        if answer.rrset is None:
            return NoData()
        return list(answer.rrset)


def _host(name: dns.name.Name) -> str:
    return "" if name == dns.name.root else name.to_text(omit_final_dot=True).lower()


def _nameserver_errors(name: str, rdtype: dns.rdatatype.RdataType, error: NoNameservers) -> str:
    """ "MX lookup of example.com: SERVFAIL" from dnspython's per-server error list."""
    reasons: list[str] = []
    for entry in error.kwargs.get("errors", []):
        text = str(entry[3])  # the RCODE ("SERVFAIL", "REFUSED") or the I/O error
        if text not in reasons:
            reasons.append(text)
    found = ", ".join(reasons) or "no nameserver answered"
    return f"{dns.rdatatype.to_text(rdtype)} lookup of {name}: {found}"
