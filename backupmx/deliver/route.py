"""Route planning (RFC 5321 §5.1): which hosts get a domain's mail, in which order — or none.

Owns invariant 4 (docs/queue.md#invariants): the backup never delivers to itself nor to any
MX at its own preference or worse.  If this host appears in a domain's MX set —
by name, or because one of an MX host's addresses is ours — every MX with a
preference >= our best one is dropped; if nothing is left, the mail stays
queued (`Defer`, "no MX better than this host"), it is never bounced and never
looped.  Postfix recognises itself by address, OpenSMTPD by name; we do both.

Decisions, for a domain:

* `RoutePlan` — the hops to try in order: better preferences first, hosts of
  equal preference shuffled (the ``rng`` argument, so tests are deterministic),
  each host's addresses in resolver order (IPv6 and IPv4 both kept).  No MX
  record: the domain itself at preference 0 (the implicit MX).  A static
  ``primary`` list is used as given, in order, without pruning.  An address
  literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``: a DSN to such a sender) is
  that address on the delivery port, without DNS (`route_literal`).
* `Bounce` — the domain takes no mail: null MX (``556 5.1.10``, RFC 7505 §4.2),
  or no such domain (NXDOMAIN, ``550 5.1.2``) for a domain we do not back up
  (the senders' domains our DSNs go to).
* `Defer` — everything else that stops delivery now: we are the best MX left,
  SERVFAIL or timeout, NXDOMAIN for a backed-up domain, no MX host with an
  address, a static primary that is this host (a configuration error that must
  not loop), an address literal that is this host.  A backed-up domain's own
  NXDOMAIN and MX hosts that do not resolve never bounce mail: a DNS accident at
  the domain's provider must not turn into mass bounces, so a backup holds the
  mail until ``max_queue_lifetime``.  Its null MX still bounces: that is the
  domain's explicit statement.  A failed MX lookup's reason starts with
  `DNS_FAILURE`, which tells the operator's views it apart (`dns_failing`).

Who "self" is (`Identity`) is decided by the caller's data, never by "is
loopback": tests run every primary on 127.0.0.x, and a loopback address is us
only when we listen on it.

`route_mx`, `route_static`, `route_literal` and the `Identity` methods are pure;
`route_mx` is four pure steps (`mx_set`, `self_preference`, `better_than`,
`in_order`).  `plan` is the only I/O (DNS through `Resolver`); `local_addresses`
reads the kernel's address lists once at start-up.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Literal

from backupmx.mail.hosts import HostPort, parse_host_port
from backupmx.queue.domains import DNS_FAILURE
from backupmx.resolver import (
    AddressAnswer,
    Addresses,
    MxAnswer,
    MxRecord,
    MxRecords,
    NoData,
    NullMx,
    NxDomain,
    Resolver,
    TempFail,
)

WILDCARDS = {4: "0.0.0.0", 6: "::"}


@dataclass(frozen=True)
class Hop:
    host: str  # the MX or static host name (or the address itself for an IP literal)
    address: str
    port: int
    preference: int  # the MX preference; the position in the list for static primaries

    def __str__(self) -> str:
        return f"{self.host}[{self.address}]:{self.port}"


@dataclass(frozen=True)
class RoutePlan:
    domain: str
    hops: tuple[Hop, ...]  # never empty
    source: Literal["mx", "implicit", "static", "literal"]


@dataclass(frozen=True)
class Defer:
    reason: str  # for last_error, the domains view and logs


@dataclass(frozen=True)
class Bounce:
    code: int  # the reply code a server would give (RFC 7505 §4.2: 556)
    status: str  # RFC 3463 enhanced status for the DSN: "5.1.10", "5.1.2"
    reason: str


Route = RoutePlan | Defer | Bounce


# --------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class Identity:
    """What "this host" is.  The caller builds it from configuration (`Identity.of`).

    * ``names`` — our hostname and aliases: lower-case A-labels, no trailing dot.
    * ``listen`` — the endpoints we accept mail on, as configured; ``0.0.0.0:p``
      and ``[::]:p`` stand for every IPv4 or IPv6 address of this machine
      (loopback included) on port p.  asyncio's servers set IPV6_V6ONLY, so
      ``[::]`` does not cover IPv4.
    * ``addresses`` — this machine's non-loopback interface addresses, plus any
      address that forwards to us (NAT, port redirects; Postfix's
      ``proxy_interfaces``).  An MX host with one of these is us, whatever the
      delivery port: a port-25 redirect on this machine leads to us too.

    Loopback addresses are never in ``addresses``: they are us only through
    ``listen``, with the port, so that primaries on 127.0.0.x in tests are not
    mistaken for this host.
    """

    names: frozenset[str]
    listen: frozenset[HostPort]
    addresses: frozenset[str]

    @classmethod
    def of(
        cls,
        hostname: str,
        aliases: Iterable[str],
        listen: Iterable[HostPort],
        machine_addresses: Iterable[str],
    ) -> Identity:
        """Normalise names and addresses; ``machine_addresses`` from `local_addresses`.

        A listen endpoint given by name (``localhost:25``) is resolved here, once.
        """
        names = frozenset(_name(n) for n in (hostname, *aliases))
        endpoints = frozenset(
            HostPort(address, e.port) for e in listen for address in _listen_addresses(e.host)
        )
        own = {_address(a) for a in machine_addresses}
        return cls(names, endpoints, frozenset(a for a in own if not _loopback(a)))

    def is_self_name(self, host: str) -> bool:
        return _name(host) in self.names

    def is_self_mx(self, address: str, port: int) -> bool:
        """An MX host's address (delivery port ``port``): ours if the machine's, any port."""
        return _address(address) in self.addresses or self.listens_on(address, port)

    def listens_on(self, address: str, port: int) -> bool:
        """True if connecting to ``address``:``port`` reaches this backupmx."""
        address = _address(address)
        if HostPort(address, port) in self.listen:
            return True
        wildcard = HostPort(WILDCARDS[ipaddress.ip_address(address).version], port)
        return wildcard in self.listen and (address in self.addresses or _loopback(address))


def _listen_addresses(host: str) -> list[str]:
    if is_ip(host):
        return [_address(host)]
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return [_address(str(sockaddr[0])) for *_, sockaddr in found]


def _name(host: str) -> str:
    return host.strip().rstrip(".").lower()


def _address(text: str) -> str:
    """Canonical text of an IP address; IPv4-mapped IPv6 becomes IPv4."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def local_addresses() -> frozenset[str]:
    """Every address of this machine's interfaces, both families, loopback included.

    Linux: IPv4 from ``/proc/net/fib_trie`` (its ``/32 host LOCAL`` entries),
    IPv6 from ``/proc/net/if_inet6``; elsewhere those files are absent and only
    the addresses the host name resolves to are found (list the others in
    ``aliases`` or rely on name matching).  Stdlib only; read at start-up and on
    reload, not per route.
    """
    found: set[str] = {"127.0.0.1", "::1"}
    try:
        for *_, sockaddr in socket.getaddrinfo(socket.gethostname(), None):
            found.add(_address(str(sockaddr[0])))
    except OSError:
        pass
    found |= _fib_trie_locals(_read(Path("/proc/net/fib_trie")))
    found |= _if_inet6(_read(Path("/proc/net/if_inet6")))
    return frozenset(found)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _fib_trie_locals(text: str) -> set[str]:
    """``|-- 192.0.2.2`` followed by ``/32 host LOCAL``: an address of this machine."""
    found: set[str] = set()
    last = ""
    for line in text.splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "|--":
            last = words[1]
        elif words[:1] == ["/32"] and words[-1:] == ["LOCAL"] and last:
            found.add(last)
    return found


def _if_inet6(text: str) -> set[str]:
    """The first column of /proc/net/if_inet6: 32 hex digits per address."""
    found: set[str] = set()
    for line in text.splitlines():
        words = line.split()
        if words and len(words[0]) == 32:
            found.add(str(ipaddress.IPv6Address(int(words[0], 16))))
    return found


# --------------------------------------------------------------------------- pure planning


def route_mx(
    domain: str,
    mx: MxAnswer,
    addresses: Mapping[str, AddressAnswer],
    identity: Identity,
    port: int,
    rng: random.Random,
    backed_up: bool = False,
) -> Route:
    """Decide from a domain's MX answer and the addresses of its hosts (keyed by host name),
    in four steps: `mx_set`, `self_preference`, `better_than`, `in_order`."""
    domain = _name(domain)
    candidates = mx_set(domain, mx, backed_up)
    if not isinstance(candidates, list):
        return candidates
    ours = self_preference(candidates, addresses, identity, port)
    records = better_than(candidates, ours)
    if ours is not None and not records:
        return Defer(
            f"no MX better than this host for {domain} (this host is MX preference {ours})"
        )
    hops, problems = in_order(records, addresses, port, rng)
    return _plan(domain, hops, "implicit" if isinstance(mx, NoData) else "mx", problems)


def mx_set(domain: str, mx: MxAnswer, backed_up: bool = False) -> list[MxRecord] | Bounce | Defer:
    """The MX hosts an answer names, each once at its best preference (``.`` targets
    name no host); no MX record at all: the domain itself at preference 0 (RFC 5321
    §5.1, the implicit MX).  A null MX bounces; NXDOMAIN bounces unless the domain is
    `backed_up` (then it is held, as a failed lookup is)."""
    if isinstance(mx, NullMx):
        return Bounce(556, "5.1.10", f"{domain} does not accept mail (null MX, RFC 7505)")
    if isinstance(mx, NxDomain) and backed_up:
        return Defer(f"{DNS_FAILURE}MX lookup of {domain}: no such domain (NXDOMAIN)")
    if isinstance(mx, NxDomain):
        return Bounce(550, "5.1.2", f"domain {domain} does not exist (NXDOMAIN)")
    if isinstance(mx, TempFail):
        return Defer(f"{DNS_FAILURE}{mx.reason}")
    if isinstance(mx, NoData):
        return [MxRecord(0, domain)]
    best: dict[str, int] = {}
    for record in mx.records:
        if record.host and record.preference < best.get(record.host, 65536):
            best[record.host] = record.preference
    return [MxRecord(preference, host) for host, preference in best.items()]


def self_preference(
    records: Sequence[MxRecord],
    addresses: Mapping[str, AddressAnswer],
    identity: Identity,
    port: int,
) -> int | None:
    """This host's best preference in the MX set — a host is us by name, or by any one
    of its addresses — or None when we are not in it."""
    mine = [
        r.preference
        for r in records
        if identity.is_self_name(r.host)
        or any(identity.is_self_mx(a, port) for a in _found(addresses.get(r.host)))
    ]
    return min(mine, default=None)


def better_than(records: list[MxRecord], ours: int | None) -> list[MxRecord]:
    """Invariant 4: the MX hosts strictly better than our own preference (all of them
    when we are not in the set)."""
    return records if ours is None else [r for r in records if r.preference < ours]


def in_order(
    records: Sequence[MxRecord],
    addresses: Mapping[str, AddressAnswer],
    port: int,
    rng: random.Random,
) -> tuple[tuple[Hop, ...], list[str]]:
    """The hops to try and why hosts were left out.  Better preferences first; hosts of
    one preference sorted, then shuffled by ``rng`` (the order depends on it alone, not
    on DNS's); each host's addresses in resolver order; each address and port once, at
    its first (best) place.  A host without an address is left out, with its reason."""
    hops: list[Hop] = []
    problems: list[str] = []
    for preference, group in groupby(sorted(records, key=_preference), _preference):
        hosts = sorted(r.host for r in group)
        rng.shuffle(hosts)
        for host in hosts:
            answer = addresses.get(host)
            if not isinstance(answer, Addresses):
                problems.append(f"{host}: {_describe(answer)}")
            hops += (Hop(host, a, port, preference) for a in _found(answer))
    return _unique(hops), problems


def route_static(
    domain: str,
    primaries: Sequence[HostPort],
    addresses: Mapping[str, AddressAnswer],
    identity: Identity,
) -> RoutePlan | Defer:
    """The configured ``primary`` list, in order; an entry that is this host defers all."""
    domain = _name(domain)
    hops: list[Hop] = []
    problems: list[str] = []
    for position, entry in enumerate(primaries):
        host = _name(entry.host)
        if is_ip(host):
            found: tuple[str, ...] = (_address(host),)
        else:
            answer = addresses.get(host)
            found = _found(answer)
            if not found:
                problems.append(f"{host}: {_describe(answer)}")
        if identity.is_self_name(host) or any(identity.listens_on(a, entry.port) for a in found):
            return Defer(f"static primary {entry} of {domain} is this host: check domain.primary")
        hops += (Hop(host, a, entry.port, position) for a in found)
    return _plan(domain, _unique(hops), "static", problems)


def route_literal(domain: str, identity: Identity, port: int) -> RoutePlan | Defer | Bounce:
    """An address literal (RFC 5321 §4.1.3) is the one host to try, on the delivery
    port; one that is this host defers, as an MX that is this host does."""
    text = domain[1:-1]
    try:
        address = _address(text[5:] if text.lower().startswith("ipv6:") else text)
    except ValueError:
        return Bounce(550, "5.1.2", f"{domain} is not an address literal")
    if identity.is_self_mx(address, port):
        return Defer(f"address literal {domain} is this host")
    return RoutePlan(domain, (Hop(address, address, port, 0),), "literal")


def _preference(record: MxRecord) -> int:
    return record.preference


def _found(answer: AddressAnswer | None) -> tuple[str, ...]:
    return tuple(_address(a) for a in answer.addresses) if isinstance(answer, Addresses) else ()


def _describe(answer: AddressAnswer | None) -> str:
    if isinstance(answer, TempFail):
        return answer.reason
    if isinstance(answer, NxDomain):
        return "no such host (NXDOMAIN)"
    if isinstance(answer, NoData):
        return "no A or AAAA record"
    return "not resolved"


def _unique(hops: list[Hop]) -> tuple[Hop, ...]:
    """One hop per address and port: the first (best) occurrence wins."""
    seen: set[tuple[str, int]] = set()
    result: list[Hop] = []
    for hop in hops:
        if (hop.address, hop.port) not in seen:
            seen.add((hop.address, hop.port))
            result.append(hop)
    return tuple(result)


def _plan(
    domain: str,
    hops: tuple[Hop, ...],
    source: Literal["mx", "implicit", "static"],
    problems: list[str],
) -> RoutePlan | Defer:
    if hops:
        return RoutePlan(domain, hops, source)
    what = {"mx": "MX host", "implicit": "implicit MX", "static": "static primary"}[source]
    return Defer(f"no address for any {what} of {domain}: {'; '.join(problems)}")


# --------------------------------------------------------------------------- I/O glue


async def plan(
    domain: str,
    resolver: Resolver,
    identity: Identity,
    static_primary: Sequence[str],
    port: int,
    rng: random.Random,
    backed_up: bool = False,
) -> Route:
    """Resolve what the domain's route needs, then decide with `route_static` or `route_mx`.

    ``static_primary`` is the domain's ``primary`` setting ("host[:port]", default
    port ``port``); empty means the MX set from DNS.  ``backed_up``: the domain is
    one of ours ([[domain]]), whose NXDOMAIN holds its mail instead of bouncing it.
    """
    domain = _name(domain)
    if domain.startswith("["):
        return route_literal(domain, identity, port)
    if static_primary:
        try:
            entries = [parse_host_port(text, default_port=port) for text in static_primary]
        except ValueError as error:
            return Defer(f"static primary of {domain}: {error}")
        names = [_name(e.host) for e in entries if not is_ip(e.host)]
        return route_static(domain, entries, await _resolve(resolver, names), identity)
    mx = await resolver.mx(domain)
    if isinstance(mx, MxRecords):
        hosts = [r.host for r in mx.records if r.host]
    else:
        hosts = [domain] if isinstance(mx, NoData) else []
    addresses = await _resolve(resolver, hosts)
    return route_mx(domain, mx, addresses, identity, port, rng, backed_up)


async def _resolve(resolver: Resolver, hosts: Iterable[str]) -> dict[str, AddressAnswer]:
    """The addresses of every distinct host, looked up concurrently."""
    unique = list(dict.fromkeys(hosts))
    answers = await asyncio.gather(*(resolver.addresses(h) for h in unique))
    return dict(zip(unique, answers, strict=True))
