"""The delivery loop: due recipients → routes → paced connections → results in the store.

Theory of operation (the layers of docs/delivering.md#the-delivery-loop, each owning
one concern):

1. `Deliverer.run` claims due recipients under a lease (several nodes may share
   the queue), ``claim_batch`` at a time, while fewer than
   ``max_recipients_in_flight`` are being worked on, and wakes at once
   when a primary comes back, a flush is asked for, or ETRN arrives; otherwise it
   polls every `POLL_SECONDS`, so a CLI flush is picked up within a second.
2. Claims are grouped by domain (one route each, from `Primaries`) and then by
   message: each message is sent once per destination with all its recipients.
3. A route's hosts are tried in order; for each, the host's `HostPacer` grants a
   connection slot and a message token, and an idle connection is reused (up to
   ``messages_per_connection``) or a new one opened.  A host that cannot be
   reached is skipped for the next; if none can, the recipients are deferred and
   the domain is marked down.
4. Results go back to the store in one transaction with their DSNs.

What each step's outcome means for the recipients (no route, a dead destination,
no host reachable, the pacer's feedback, the rows for the store) is decided by the
pure functions of `attempt.py`; this module does the waiting and the I/O.

Invariants kept here: a recipient is recorded only by the lease owner; a
delivered recipient is never sent again (partial results are recorded per
recipient); no route ever includes this host (`route.plan` prunes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog

from backupmx import metrics
from backupmx.deliver.attempt import (
    SendReport,
    dead_destination,
    keeps_connection,
    pacer_feedback,
    result,
    retry_time,
    unreachable,
    without_route,
)
from backupmx.deliver.client import ConnectFailed, PrimaryConnection, Target, Timeouts, connect
from backupmx.deliver.pacer import HostPacer, Pacers
from backupmx.deliver.primaries import Primaries, target
from backupmx.deliver.route import Defer, RoutePlan
from backupmx.mail.reply import Outcome, deferred
from backupmx.queue.records import Claim, NewMessage, Outbound, Result, utcnow
from backupmx.queue.state import Event
from backupmx.queue.store import Store

log = structlog.get_logger("backupmx.deliver")

# Constants, not settings: neither changes what is delivered, only how soon idle
# work is noticed.  A wake-up (ETRN, a primary back) cuts the poll short in this
# process; the poll is what sees recipients come due and a flush asked for by the
# CLI or another node, and one second is as long as an operator should wait for it.
POLL_SECONDS = 1.0
# An idle connection is reused by the next message within this, and closed after it:
# a flush keeps its connections busy, and a primary's own idle timeout (Postfix's
# smtpd_timeout, 300 s) is far longer, so no operator has a reason to tune it.
IDLE_CONNECTION_SECONDS = 10.0


@dataclass(frozen=True)
class DeliverySettings:
    helo: str
    lease: float
    retry_min: float
    retry_max: float
    messages_per_connection: int
    timeouts: Timeouts
    ca_file: str
    max_recipients_in_flight: int
    claim_batch: int


# The DSNs for one attempt's results (message, claims, outcomes, the host that
# answered, whether it offered DSN): the bounce stage's, handed in by the application.
ResultNotices = Callable[
    [Outbound, Sequence[Claim], Sequence[Outcome], Target | None, bool], list[NewMessage]
]


class Deliverer:
    def __init__(
        self,
        store: Store,
        primaries: Primaries,
        pacers: Pacers,
        notices: ResultNotices,
        settings: DeliverySettings,
        owner: str,
    ) -> None:
        self.store = store
        self.primaries = primaries
        self.pacers = pacers
        self.notices = notices
        self.settings = settings
        self.owner = owner
        self._wake = asyncio.Event()
        self._room = asyncio.Condition()
        self._in_flight = 0
        self._idle: dict[Target, list[tuple[float, PrimaryConnection]]] = defaultdict(list)
        self._tasks: set[asyncio.Task[None]] = set()
        self._rng = random.Random()

    def wake(self, _reason: str = "") -> None:
        self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                await self._wait_for_room()
                claimed_at = time.monotonic()
                claims = await self.store.claim(
                    self.owner,
                    min(
                        self.settings.claim_batch,
                        self.settings.max_recipients_in_flight - self._in_flight,
                    ),
                    timedelta(seconds=self.settings.lease),
                )
                if not claims:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
                    await self._close_idle()
                    continue
                self._in_flight += len(claims)
                by_domain: dict[str, list[Claim]] = defaultdict(list)
                for claim in claims:
                    by_domain[claim.domain].append(claim)
                for domain, group in by_domain.items():
                    self.primaries.claimed(domain)
                    self._spawn(self._deliver_domain(domain, group, claimed_at))
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Cancel work in progress (its leases are given back by the app) and close connections."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for connections in self._idle.values():
            for _, connection in connections:
                await connection.close()
        self._idle.clear()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wait_for_room(self) -> None:
        async with self._room:
            await self._room.wait_for(
                lambda: self._in_flight < self.settings.max_recipients_in_flight
            )

    async def _done(self, count: int) -> None:
        async with self._room:
            self._in_flight -= count
            self._room.notify_all()

    # ------------------------------------------------------------------ one domain

    async def _deliver_domain(self, domain: str, claims: list[Claim], claimed_at: float) -> None:
        try:
            route = await self.primaries.route(domain)
            if not isinstance(route, RoutePlan):
                outcome = without_route(route)
                if isinstance(route, Defer):  # a bounce says nothing of the primary
                    await self.primaries.observed(domain, False, route.reason, route)
                messages = await self.store.outbound({c.message_id for c in claims})
                await self._record_grouped(messages, claims, [outcome] * len(claims), None, True)
                return
            messages = await self.store.outbound({c.message_id for c in claims})
            by_message: dict[str, list[Claim]] = defaultdict(list)
            for claim in claims:
                by_message[claim.message_id].append(claim)
            # A message deleted by an admin since the claim has no recipients left to send.
            await asyncio.gather(
                *(
                    self._deliver_message(domain, route, messages[mid], group, claimed_at)
                    for mid, group in by_message.items()
                    if mid in messages
                )
            )
        except Exception as error:
            # Recipients already recorded are no longer ours to change, so deferring
            # every claim of this group touches only those still in flight.
            log.exception("delivery_failed", domain=domain, error=str(error))
            later = utcnow() + timedelta(seconds=self.settings.retry_min)
            await self.store.record(
                self.owner,
                [
                    Result(c.recipient_id, Event.TEMPFAIL, f"internal error: {error}", later)
                    for c in claims
                ],
            )
        finally:
            await self._done(len(claims))

    async def _deliver_message(
        self,
        domain: str,
        route: RoutePlan,
        message: Outbound,
        claims: list[Claim],
        claimed_at: float,
    ) -> None:
        waited = dead_destination(self.primaries.down_since(domain), claimed_at)
        if waited is not None:
            await self._record(message, claims, [waited] * len(claims), None, True)
            return
        failures: list[str] = []
        hold = self.primaries.in_hold_window(domain)
        tls = self.primaries.policies(domain).tls
        for hop in self.primaries.hops(route):
            where = target(hop)
            pacer = self.pacers[where.address]
            async with pacer.slot():
                try:
                    connection = await self._connection(where, tls)
                except ConnectFailed as error:
                    pacer.congestion()
                    failures.append(str(error))
                    continue
                await pacer.message_token()
                sending = metrics.clock()
                report = await connection.send(message, claims, hold)
                metrics.message_sent(sending)
                self._feedback(pacer, report)
                await self._release(connection, report)
            await self._record(message, claims, report.outcomes, where, report.dsn_supported)
            await self.primaries.observed(domain, True, f"delivery via {where}", route)
            return
        reason = unreachable(failures)
        await self._record(message, claims, [deferred(reason)] * len(claims), None, True)
        await self.primaries.observed(domain, False, reason, route)

    @staticmethod
    def _feedback(pacer: HostPacer, report: SendReport) -> None:
        feedback = pacer_feedback(report)
        if feedback == "congestion":
            pacer.congestion()
        elif feedback == "success":
            pacer.success()

    async def _connection(self, where: Target, tls: str) -> PrimaryConnection:
        idle = self._idle.get(where)
        while idle:
            _, connection = idle.pop()
            if connection.smtp.is_connected:
                return connection
        return await connect(
            where, self.settings.helo, tls, self.settings.ca_file, self.settings.timeouts
        )

    async def _release(self, connection: PrimaryConnection, report: SendReport) -> None:
        if keeps_connection(report, connection.sent, self.settings.messages_per_connection):
            self._idle[connection.target].append((asyncio.get_running_loop().time(), connection))
        else:
            await connection.close()

    async def _close_idle(self) -> None:
        now = asyncio.get_running_loop().time()
        for where, connections in list(self._idle.items()):
            keep = [(t, c) for t, c in connections if now - t < IDLE_CONNECTION_SECONDS]
            for t, connection in connections:
                if now - t >= IDLE_CONNECTION_SECONDS:
                    await connection.close()
            if keep:
                self._idle[where] = keep
            else:  # one entry per host in use, not per host ever used (DSNs go anywhere)
                del self._idle[where]

    # ------------------------------------------------------------------ results

    async def _record_grouped(
        self,
        messages: dict[str, Outbound],
        claims: Sequence[Claim],
        outcomes: Sequence[Outcome],
        where: Target | None,
        dsn_supported: bool,
    ) -> None:
        by_message: dict[str, list[tuple[Claim, Outcome]]] = defaultdict(list)
        for claim, outcome in zip(claims, outcomes, strict=True):
            by_message[claim.message_id].append((claim, outcome))
        for message_id, pairs in by_message.items():
            await self._record(
                messages[message_id],
                [c for c, _ in pairs],
                [o for _, o in pairs],
                where,
                dsn_supported,
            )

    async def _record(
        self,
        message: Outbound,
        claims: Sequence[Claim],
        outcomes: Sequence[Outcome],
        where: Target | None,
        dsn_supported: bool,
    ) -> None:
        retry_at = retry_time(
            utcnow(), claims, self.settings.retry_min, self.settings.retry_max, self._rng
        )
        results = []
        for claim, outcome in zip(claims, outcomes, strict=True):
            results.append(result(claim, outcome, retry_at))
            metrics.recipient_result(claim.domain, outcome.verdict.value, message.received_at)
            log.info(
                "recipient_" + outcome.verdict.value,
                queue_id=message.id,
                recipient=claim.address,
                relay=str(where) if where else None,
                reply=outcome.diagnostic,
            )
        notices = self.notices(message, claims, outcomes, where, dsn_supported)
        await self.store.record(self.owner, results, notices)
