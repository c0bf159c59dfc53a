"""What we know of each destination: its route, whether its primary is up, since when.

Promises:

* A domain moves ``down → up`` (or ``unknown → up``) on the first successful
  probe or delivery, and at that moment all its queued recipients become due —
  not at their next backoff time — and the deliverer is woken
  (docs/delivering.md#probes-and-the-primarys-state).
* A domain moves ``up → down`` only when its primary is really unreachable:
  `FAILURES_IN_A_ROW` deliveries or probes failed with no success between them
  (`out_of_reach`).  A primary that limits its sessions turns away the one
  beyond its limit (``421``) while the others deliver; that is the pacer's
  business (`backupmx.deliver.pacer`), not an outage.  A domain not known up
  (``unknown``, ``down``, or not written by this process yet) goes down on its
  first failure.
* Probes (TCP connect, EHLO, QUIT; no mail) run for every domain with queued
  mail that no delivery reached within `DELIVERED_LATELY`, against the best
  host of its route, every ``probe_interval``.  Each domain's probe is a task
  of its own: a primary may take minutes to greet
  (``greeting_timeout``, RFC 5321 §4.5.3.2.1), and one that does never holds up
  the other domains' probes; its domain is probed again once that probe ends.
* A route without a host to try (`Defer`: the domain's MX lookup fails — NXDOMAIN
  included, for a backed-up domain — or no MX is better than this host) marks the
  domain down with that reason, as an unreachable primary does: its mail waits
  for the probes.  Only a `Bounce` (null MX, NXDOMAIN of a domain not backed up)
  makes the domain's mail due, to be bounced.
* State is written to the ``domains`` table, so ``backupmx domains`` and every
  node sharing the queue see it.  What this node sees is its own view
  (``primary_views``); the shared state is up while any live node reaches the
  primary (`backupmx.queue.domains.Domains.set_domain_state`), and this node
  leaves alone the mail of a domain it cannot reach itself.

The state follows the table of `backupmx.queue.state` (`PRIMARY_TRANSITIONS`);
what this process remembers of each domain (the state it last wrote, since when
the primary is up, its first failure since the last success) is one `Primary`
record, so the deliverer's views of a domain cannot disagree.

Routes are cached for `ROUTE_TTL` seconds so that a flush of thousands of
messages does not ask DNS thousands of times.

What this process remembers stays bounded while the destinations grow with the
mail (our DSNs go to every sender's domain): routes past `ROUTE_TTL` are dropped,
and at most `MAX_ROUTES` routes and `MAX_KNOWN_DOMAINS` records are kept, the
least recently written going first.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import structlog

from backupmx.deliver.client import ConnectFailed, Target, Timeouts, connect
from backupmx.deliver.membership import Membership
from backupmx.deliver.route import Bounce, Hop, Identity, Route, RoutePlan, plan
from backupmx.queue.records import utcnow
from backupmx.queue.state import PrimaryEvent, PrimaryState, next_primary_state, primary_target
from backupmx.queue.store import Store
from backupmx.resolver import Resolver

log = structlog.get_logger("backupmx.deliver")

# Seconds a domain's route is reused.  Not a setting: it only spares DNS the same
# question once per message of a flush; it is shorter than MX records' TTLs in
# practice (an hour is usual), DNS changes are seen within half a minute, and a
# probe always resolves afresh.
ROUTE_TTL = 30.0
# Seconds within which a domain's unchanged state is not rewritten (every delivery
# reports it; a flush of thousands of messages must not write thousands of rows).
# Not a setting: a change of state is always written at once; this only bounds
# how stale the ``updated_at``, route and reason of an unchanged state can be.
STATE_REFRESH = 10.0
# Routes kept at most, however many domains a flush of DSNs reaches within ROUTE_TTL;
# a route dropped early is only asked of DNS again.
MAX_ROUTES = 10_000
# Domain records (`Primary`) kept at most, beyond those of domains with
# on_primary_5xx = "hold" (backed-up domains, as few as the configuration names),
# whose hold window needs `up_since`.  Forgetting any other record costs one more
# write of the domain's state, and lets messages of it claimed before a failure
# knock on its host instead of waiting at once (the store hands out no more of a
# domain marked down); that takes ten thousand other domains written while it waits.
MAX_KNOWN_DOMAINS = 10_000
# Failures in a row (deliveries and probes, no success between them) that show a
# primary known up to be unreachable.  Not a setting: a primary that is really gone
# fails every attempt, so three come within moments of each other, while one at its
# session limit turns away a connection now and then between deliveries.
FAILURES_IN_A_ROW = 3
# Seconds after a delivery reached a domain's primary within which the domain is not
# probed: its deliveries show that the primary answers, and a probe would only take
# one more of its sessions (one past its limit: a 421).  Not a setting: it only
# spares probes of a domain being delivered to.
DELIVERED_LATELY = 10.0


@dataclass(frozen=True)
class DomainPolicy:
    """The per-domain settings the deliverer needs (from [[domain]] or defaults)."""

    backed_up: bool = False  # a [[domain]] entry names it: its NXDOMAIN holds, not bounces
    static_primary: tuple[str, ...] = ()
    on_primary_5xx: str = "bounce"
    hold_window: float = 3600.0
    tls: str = "may"


@dataclass(frozen=True)
class Primary:
    """What this process knows of one domain's primary, in one record so that its
    facts cannot drift apart."""

    written: PrimaryState | None = None  # the state this process last wrote; None: none yet
    written_at: float = 0.0  # when (monotonic), for STATE_REFRESH
    up_since: datetime | None = None  # when this process saw it come up (the hold window)
    failed: tuple[float, str] | None = None  # when (monotonic) and why it went unreachable
    delivered: float | None = None  # when (monotonic) a delivery last reached it
    failures: int = 0  # deliveries and probes failed since the last success


def out_of_reach(known: Primary) -> bool:
    """Whether the failures in `known` (the last one counted) show its primary
    unreachable: at once unless it is known up, else after FAILURES_IN_A_ROW."""
    return known.written is not PrimaryState.UP or known.failures >= FAILURES_IN_A_ROW


def describe(route: Route) -> str:
    if isinstance(route, RoutePlan):
        return ", ".join(str(target(h)) for h in route.hops)
    return route.reason


def target(hop: Hop) -> Target:
    return Target(hop.host, hop.address, hop.port)


class Primaries:
    def __init__(
        self,
        store: Store,
        resolver: Resolver,
        identity: Identity,
        policies: Callable[[str], DomainPolicy],
        port: int,
        helo: str,
        timeouts: Timeouts,
        membership: Membership,
    ) -> None:
        self.store = store
        self.membership = membership
        self.resolver = resolver
        self.identity = identity
        self.policies = policies
        self.port = port
        self.helo = helo
        self.timeouts = timeouts
        self.on_up: Callable[[str], None] = lambda domain: None  # the deliverer's wake-up
        # Both least recently written first, and bounded (see the module docstring).
        self._routes: dict[str, tuple[float, Route]] = {}
        self._known: dict[str, Primary] = {}
        self._rng = random.Random()
        self._probing: dict[str, asyncio.Task[None]] = {}  # domain -> its probe in flight

    async def route(self, domain: str, fresh: bool = False) -> Route:
        cached = self._routes.get(domain)
        if cached and not fresh and time.monotonic() - cached[0] < ROUTE_TTL:
            return cached[1]
        policy = self.policies(domain)
        result = await plan(
            domain,
            self.resolver,
            self.identity,
            policy.static_primary,
            self.port,
            self._rng,
            policy.backed_up,
        )
        now = time.monotonic()
        self._routes.pop(domain, None)
        self._routes[domain] = (now, result)
        while (
            len(self._routes) > MAX_ROUTES
            or now - next(iter(self._routes.values()))[0] >= ROUTE_TTL
        ):
            del self._routes[next(iter(self._routes))]
        return result

    def hops(self, route: RoutePlan) -> list[Hop]:
        """The route's hosts for one message: equal preferences in a fresh random order
        each time (RFC 5321 §5.1), so a cached route still spreads the load; a host's
        addresses stay together, and a static route keeps the order it was given."""
        if route.source == "static":
            return list(route.hops)
        groups: dict[int, dict[str, list[Hop]]] = {}
        for hop in route.hops:
            groups.setdefault(hop.preference, {}).setdefault(hop.host, []).append(hop)
        ordered: list[Hop] = []
        for preference in sorted(groups):
            hosts = list(groups[preference].values())
            self._rng.shuffle(hosts)
            ordered += [hop for host in hosts for hop in host]
        return ordered

    def in_hold_window(self, domain: str) -> bool:
        """True while a primary that just came back may still be misconfigured."""
        policy = self.policies(domain)
        if policy.on_primary_5xx != "hold":
            return False
        since = self._primary(domain).up_since  # unknown (e.g. after a restart): stay careful
        return since is None or utcnow() - since < timedelta(seconds=policy.hold_window)

    async def observed(
        self, domain: str, up: bool, detail: str, route: Route | None = None, probe: bool = False
    ) -> None:
        """A delivery's or probe's result: record it; on down → up, release the domain's
        mail; a failure marks the domain down only when it shows the primary out of reach."""
        now = time.monotonic()
        if up:
            known = replace(self._primary(domain), failures=0, failed=None)
            if not probe:
                known = replace(known, delivered=now)
        else:
            known = self._primary(domain)
            known = replace(known, failures=known.failures + 1)
            if not out_of_reach(known):
                self._remember(domain, known)
                return
            known = replace(known, failed=known.failed or (now, detail))
        event = PrimaryEvent.ANSWERED if up else PrimaryEvent.UNREACHABLE
        state = next_primary_state(known.written or PrimaryState.UNKNOWN, event)
        if known.written == state and now - known.written_at < STATE_REFRESH:
            self._remember(domain, known)
            return
        self._remember(domain, replace(known, written=state, written_at=now))
        changed = await self.store.set_domain_state(
            domain,
            state,
            node=self.membership.name,
            others=self.membership.others(),
            route=describe(route) if route is not None else None,
            reason="" if up else detail,
        )
        if changed:
            up_since = utcnow() if up else None
            self._remember(domain, replace(self._primary(domain), up_since=up_since))
            if up:
                released = await self.store.make_due(domain=domain)
                log.info("primary_up", domain=domain, released=released, detail=detail)
                self.on_up(domain)
            else:
                log.info("primary_down", domain=domain, detail=detail)

    def claimed(self, domain: str) -> None:
        """Recipients of `domain` were claimed.  The store never hands out a domain
        marked down, so if this process last wrote "down", something else (an
        operator's flush, ETRN) has retried it: the record follows, so that the next
        result is written again, not skipped as a repeat."""
        known = self._primary(domain)
        if known.written is PrimaryState.DOWN:
            retried = next_primary_state(known.written, PrimaryEvent.RETRY)
            self._remember(domain, replace(known, written=retried))

    def down_since(self, domain: str) -> tuple[float, str] | None:
        """When (monotonic) and why this process saw the domain's primary become
        unreachable, if it has not answered since."""
        return self._primary(domain).failed

    def _primary(self, domain: str) -> Primary:
        return self._known.get(domain, Primary())

    def _remember(self, domain: str, record: Primary) -> None:
        """Keep `record` as the most recent; past MAX_KNOWN_DOMAINS, forget the least
        recently written records that no hold window needs."""
        self._known.pop(domain, None)
        self._known[domain] = record
        excess = len(self._known) - MAX_KNOWN_DOMAINS
        forgotten: list[str] = []
        for name in self._known:
            if len(forgotten) >= excess:
                break
            if self.policies(name).on_primary_5xx != "hold":
                forgotten.append(name)
        for name in forgotten:
            del self._known[name]

    async def probe_all(self) -> None:
        """The scheduled job: start a probe for every domain with queued mail that has
        none in flight; it does not wait for them (see the module docstring)."""
        loop = asyncio.get_running_loop()
        try:
            pending = await self.store.pending_domains()
        except Exception as error:  # the database restarts: the next round asks again
            log.warning("probes_skipped", error=str(error))
            return
        now = time.monotonic()
        for domain in pending:
            delivered = self._primary(domain).delivered
            if delivered is not None and now - delivered < DELIVERED_LATELY:
                continue
            if domain not in self._probing:
                self._probing[domain] = loop.create_task(
                    self._probe_in_flight(domain), name=f"probe {domain}"
                )

    async def _probe_in_flight(self, domain: str) -> None:
        try:
            await self.probe(domain)
        except Exception as error:  # the next round tries again
            log.exception("probe_failed", domain=domain, error=str(error))
        finally:
            self._probing.pop(domain, None)

    async def close(self) -> None:
        """Cancel the probes in flight (at shutdown)."""
        probes = list(self._probing.values())
        for probe in probes:
            probe.cancel()
        await asyncio.gather(*probes, return_exceptions=True)

    async def probe(self, domain: str) -> tuple[Route, list[tuple[Target, str, float]]]:
        """Probe the best host of the domain's route; return the route and each try."""
        route = await self.route(domain, fresh=True)
        tries: list[tuple[Target, str, float]] = []
        if isinstance(route, Bounce):
            # Nothing to wait for: the deliverer bounces the domain's mail at once.
            await self.store.set_domain_state(
                domain, primary_target(PrimaryEvent.NO_PRIMARY), node=self.membership.name,
                route=describe(route), reason=route.reason, probe_result=route.reason,
            )  # fmt: skip
            await self.store.make_due(domain=domain, retry_down=True)
            self.on_up(domain)
            return route, tries
        if not isinstance(route, RoutePlan):
            await self.store.set_domain_state(
                domain, primary_target(PrimaryEvent.UNREACHABLE), node=self.membership.name,
                others=self.membership.others(), route=describe(route), reason=route.reason,
                probe_result=route.reason,
            )  # fmt: skip
            return route, tries
        for hop in route.hops:
            result, seconds = await self.probe_host(target(hop))
            tries.append((target(hop), result, seconds))
            if result.startswith("ok"):
                await self.store.set_domain_state(domain, probe_result=f"{target(hop)} {result}")
                await self.observed(
                    domain, True, f"probe of {target(hop)}: {result}", route, probe=True
                )
                return route, tries
        detail = "; ".join(f"{t}: {r}" for t, r, _ in tries)
        await self.store.set_domain_state(domain, probe_result=detail)
        await self.observed(domain, False, detail, route)
        return route, tries

    async def probe_host(self, where: Target) -> tuple[str, float]:
        started = time.monotonic()
        try:
            connection = await connect(where, self.helo, "may", "", self.timeouts, starttls=False)
        except ConnectFailed as error:
            return str(error), time.monotonic() - started
        await connection.close()
        return "ok: EHLO answered", time.monotonic() - started
