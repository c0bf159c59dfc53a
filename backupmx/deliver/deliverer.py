"""The delivery loop: due recipients → routes → paced connections → results in the store.

Theory of operation (the layers of docs/delivering.md#the-delivery-loop, each owning
one concern):

1. `Deliverer.run` claims due recipients under this node's lease (several nodes
   may share the queue: `backupmx.deliver.membership`), at most ``claim_batch``
   at a time, and only while its fence holds, fewer than
   ``max_recipients_in_flight`` are being worked on, and at most one batch is
   waiting for a connection slot: a node takes what its connections can start
   on soon, in small batches, and leaves the rest of a backlog to the others.
   It wakes at once when a primary comes back, a flush is asked for, ETRN
   arrives or a dead node's work is given back; otherwise it polls every
   `POLL_SECONDS`, so a CLI flush is picked up within a second.
2. Claims are grouped by domain (one route each, from `Primaries`) and then by
   message: each message is sent once per destination with all its recipients.
3. A route's hosts are tried in order; for each, the host's `HostPacer` grants a
   connection slot and a message token, and an idle connection is reused (up to
   ``messages_per_connection``) or a new one opened.  A host that cannot be
   reached is skipped for the next; if none can, the recipients are deferred and
   the domain is marked down.  A large body is read only once a connection is
   there, within the `BodyBudget` of large bodies in memory
   (`backupmx.deliver.bodies`), whose room is taken before the connection slot.
4. Results go back to the store in one transaction with their DSNs.

What each step's outcome means for the recipients (no route, a dead destination,
no host reachable, the pacer's feedback, the rows for the store) is decided by the
pure functions of `attempt.py`; this module does the waiting and the I/O.

Invariants kept here: a message is sent only while this node's fence holds for
the claim (checked right before each send), and a recipient is recorded only by
its lease owner, under the same claim (the store checks); a delivered recipient
is never sent again (partial results are recorded per recipient); no route ever
includes this host (`route.plan` prunes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import structlog

from backupmx import metrics
from backupmx.deliver.attempt import (
    SendReport,
    dead_destination,
    keeps_connection,
    log_events,
    pacer_feedback,
    result,
    retry_time,
    unreachable,
    without_route,
)
from backupmx.deliver.bodies import BodyBudget
from backupmx.deliver.client import ConnectFailed, PrimaryConnection, Target, Timeouts, connect
from backupmx.deliver.membership import Membership
from backupmx.deliver.pacer import HostPacer, Pacers
from backupmx.deliver.primaries import Primaries, target
from backupmx.deliver.route import Defer, Route, RoutePlan
from backupmx.mail.reply import Outcome, Verdict, deferred
from backupmx.queue.records import Claim, NewMessage, Outbound, Result, UnknownMessage, utcnow
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
        membership: Membership,
    ) -> None:
        self.store = store
        self.primaries = primaries
        self.pacers = pacers
        self.notices = notices
        self.settings = settings
        self.membership = membership
        self.owner = membership.name
        self.delivered = 0  # messages delivered (to at least one recipient) since start
        self._wake = asyncio.Event()
        self._room = asyncio.Condition()
        self._in_flight = 0  # recipients claimed and not yet recorded
        self._sending = 0  # of those, recipients whose message holds a connection slot
        self._recording = 0  # and those whose results are on their way to the store
        # Results the database could not take when they came (`_store`), for later.
        self._unrecorded: list[tuple[Sequence[Result], Sequence[NewMessage]]] = []
        self._recording_late = asyncio.Lock()
        self._idle: dict[Target, list[tuple[float, PrimaryConnection]]] = defaultdict(list)
        self._tasks: set[asyncio.Task[None]] = set()
        self._rng = random.Random()
        self._bodies = BodyBudget()  # large bodies read at send time, bytes at once

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def wake(self, _reason: str = "") -> None:
        self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                await self.record_unrecorded()
                if not await self._room_to_claim():
                    await self._close_idle()
                    continue
                claimed_at = time.monotonic()
                epoch = self.membership.epoch
                try:
                    claims = await self.store.claim(
                        self.owner,
                        min(
                            self.settings.claim_batch,
                            self.settings.max_recipients_in_flight - self._in_flight,
                        ),
                    )
                except Exception as error:  # the database restarts, fails over: try again
                    log.warning("claim_failed", error=str(error))
                    await asyncio.sleep(POLL_SECONDS)
                    continue
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
                    self._spawn(self._deliver_domain(domain, group, claimed_at, epoch))
        finally:
            await self.stop()

    def lapse(self) -> None:
        """This node's fence fell: close the idle connections.  No message is sent from
        now on under the claims made so far (each send checks the fence), and no claim
        is made until the fence holds again.  A send already under way is not cut: its
        body has usually left already, so cutting it would not make it undelivered,
        only leave its result unknown; the store records that result only if the
        recipient is still this node's, and logs it (``result_after_lease_lost``)
        otherwise, which is how a duplicate of RFC 5321 §6.1 shows."""
        idle, self._idle = self._idle, defaultdict(list)
        for connections in idle.values():
            for _, connection in connections:
                connection.smtp.close()  # not a session more at the primary than we use

    def share(self, nodes: int) -> None:
        """`nodes` live nodes now share each primary host's budget: idle connections
        beyond this node's new share are closed at once."""
        if self.pacers.share(nodes):
            self._spawn(self._close_idle())

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

    async def _room_to_claim(self) -> bool:
        """Wait (up to `POLL_SECONDS`: the fence is a matter of time) until this node may
        claim more; False if it may not yet."""
        async with self._room:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait_for(self._may_claim), POLL_SECONDS)
            return self._may_claim()

    def _may_claim(self) -> bool:
        # Results waiting for their group commit do not wait for a connection: counted
        # as waiting, a commit's latency kept the connections idle during a flush.
        waiting = self._in_flight - self._sending - self._recording
        return (
            self._in_flight < self.settings.max_recipients_in_flight
            and waiting <= self.settings.claim_batch
            and self.membership.holds()
        )

    async def _slot_taken(self, count: int) -> None:
        async with self._room:
            self._sending += count
            self._notify_room()

    async def _done(self, count: int) -> None:
        async with self._room:
            self._in_flight -= count
            self._notify_room()

    def _notify_room(self) -> None:
        # Only when a claim may follow: in a flush every message changes the counts
        # three times, and a claim loop woken for nothing costs a task step each.
        if self._may_claim():
            self._room.notify_all()

    # ------------------------------------------------------------------ one domain

    async def _deliver_domain(
        self, domain: str, claims: list[Claim], claimed_at: float, epoch: int
    ) -> None:
        settled = 0  # claims already out of flight, message by message

        async def deliver(route: RoutePlan, message: Outbound, group: list[Claim]) -> None:
            nonlocal settled
            try:
                await self._deliver_message(domain, route, message, group, claimed_at, epoch)
            finally:
                settled += len(group)
                await self._done(len(group))

        try:
            route = await self.primaries.route(domain)
            if not isinstance(route, RoutePlan):
                outcome = without_route(route)
                if isinstance(route, Defer):  # a bounce says nothing of the primary
                    await self._observed(domain, False, route.reason, route)
                messages = await self.store.outbound({c.message_id for c in claims})
                await self._record_grouped(messages, claims, [outcome] * len(claims), None, True)
                return
            messages = await self.store.outbound({c.message_id for c in claims})
            by_message: dict[str, list[Claim]] = defaultdict(list)
            for claim in claims:
                by_message[claim.message_id].append(claim)
            # A message deleted by an admin since the claim has no recipients left to send.
            # Each message leaves the flight as soon as it is recorded, not with the last
            # of its batch: a batch's slowest message must not keep the next claim waiting.
            # A failure is handled below once every message is done, so that no message
            # is still being sent when the group's recipients are deferred.
            done = await asyncio.gather(
                *(
                    deliver(route, messages[mid], group)
                    for mid, group in by_message.items()
                    if mid in messages
                ),
                return_exceptions=True,
            )
            failures = [outcome for outcome in done if isinstance(outcome, Exception)]
            if failures:
                raise failures[0]
        except Exception as error:
            # Recipients already recorded are no longer ours to change, so deferring
            # every claim of this group touches only those still in flight.
            log.exception("delivery_failed", domain=domain, error=str(error))
            later = utcnow() + timedelta(seconds=self.settings.retry_min)
            await self._store(
                [
                    Result(c.recipient_id, Event.TEMPFAIL, f"internal: {error}", later, c.attempts)
                    for c in claims
                ],
                [],
            )
        finally:
            await self._done(len(claims) - settled)

    async def _deliver_message(
        self,
        domain: str,
        route: RoutePlan,
        message: Outbound,
        claims: list[Claim],
        claimed_at: float,
        epoch: int,
    ) -> None:
        waited = dead_destination(self.primaries.down_since(domain), claimed_at)
        if waited is not None:
            await self._record(message, claims, [waited] * len(claims), None, True)
            return
        # Room for a large body is taken before a connection slot, so that a message
        # waiting for room keeps no connection to the primary idle; the body itself is
        # read only once a connection is there (a primary that is down costs no read).
        async with self._bodies.room(message.size if message.body is None else 0):
            await self._send(domain, route, message, claims, epoch)

    async def _send(
        self, domain: str, route: RoutePlan, message: Outbound, claims: list[Claim], epoch: int
    ) -> None:
        """Try the route's hosts in turn; record the outcome."""
        failures: list[str] = []
        hold = self.primaries.in_hold_window(domain)
        tls = self.primaries.policies(domain).tls
        hops = self.primaries.hops(route)
        turned_away: set[Target] = set()
        while hops:
            hop = hops.pop(0)
            where = target(hop)
            pacer = self.pacers[where.address]
            async with pacer.slot():
                await self._slot_taken(len(claims))
                try:
                    try:
                        connection = await self._connection(where, tls)
                    except ConnectFailed as error:
                        pacer.congestion()
                        if pacer.active > 1 and where not in turned_away:
                            # Turned away while other connections to it are open: the
                            # host is at its session limit, not down.  Wait for a slot
                            # of the smaller window, once, rather than defer the message.
                            turned_away.add(where)
                            hops.insert(0, hop)
                        else:
                            failures.append(str(error))
                        continue
                    await pacer.message_token()
                    if message.body is None:  # a large body, read only now
                        message = replace(message, body=await self._body(message.id))
                        if not message.body:  # deleted since the claim: nothing to send
                            await connection.close()
                            return
                    if not self.membership.holds(epoch):
                        # Another node may have these recipients by now: not a byte more.
                        log.warning("send_abandoned", queue_id=message.id, reason="fence lost")
                        await connection.close()
                        return
                    sending = metrics.clock()
                    try:
                        # Asked again before the body: a pause between the commands
                        # and the 354 must not let the body out after a takeover.
                        report = await connection.send(
                            message, claims, hold, lambda: self.membership.holds(epoch)
                        )
                    except asyncio.CancelledError:
                        connection.smtp.close()  # shutting down: the reply is not waited for
                        raise
                    if report.abandoned:  # closed inside DATA: nothing was delivered
                        log.warning(
                            "send_abandoned", queue_id=message.id, reason="fence lost before body"
                        )
                        return
                    metrics.message_sent(sending)
                    self._feedback(pacer, report)
                    await self._release(connection, report, pacer)
                finally:
                    await self._slot_taken(-len(claims))
            await self._record(message, claims, report.outcomes, where, report.dsn_supported)
            await self._observed(domain, True, f"delivery via {where}", route)
            return
        reason = unreachable(failures)
        await self._record(message, claims, [deferred(reason)] * len(claims), None, True)
        await self._observed(domain, False, reason, route)

    async def _body(self, message_id: str) -> bytes:
        """A large body, read when it is needed; empty if the message has gone since the
        claim (finished, deleted)."""
        try:
            return await self.store.body(message_id)
        except UnknownMessage:
            return b""

    async def _observed(self, domain: str, up: bool, detail: str, route: Route) -> None:
        """Tell `Primaries` what a delivery saw.  The results are recorded by then, so a
        database that cannot take the domain's state must not turn them into an error
        of the whole group (the next delivery or probe writes the state)."""
        try:
            await self.primaries.observed(domain, up, detail, route)
        except Exception as error:
            log.warning("primary_state_unwritten", domain=domain, error=str(error))

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

    async def _release(
        self, connection: PrimaryConnection, report: SendReport, pacer: HostPacer
    ) -> None:
        idle = self._idle[connection.target]
        if keeps_connection(
            report, connection.sent, self.settings.messages_per_connection
        ) and pacer.keeps_idle(len(idle)):
            idle.append((asyncio.get_running_loop().time(), connection))
        else:
            await connection.close()

    async def _close_idle(self) -> None:
        """Close connections idle for `IDLE_CONNECTION_SECONDS`, and those beyond their
        host's free slots (a smaller share of the budget)."""
        now = asyncio.get_running_loop().time()
        for where, connections in list(self._idle.items()):
            pacer = self.pacers[where.address]
            room = max(pacer.limit - pacer.active, 0)
            fresh = [(t, c) for t, c in connections if now - t < IDLE_CONNECTION_SECONDS]
            keep = fresh[-room:] if room else []
            # Out of the pool before the first await: a delivery must not take a
            # connection that is being closed (its message would be deferred).
            if keep:
                self._idle[where] = keep
            else:  # one entry per host in use, not per host ever used (DSNs go anywhere)
                del self._idle[where]
            for entry in connections:
                if entry not in keep:
                    await entry[1].close()

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
        if any(o.verdict is Verdict.DELIVERED for o in outcomes):
            self.delivered += 1
        for claim, outcome in zip(claims, outcomes, strict=True):
            results.append(result(claim, outcome, retry_at, str(where) if where else None))
            metrics.recipient_result(claim.domain, outcome.verdict.value, message.received_at)
        relay = str(where) if where else None
        for event, fields in log_events(claims, outcomes):
            log.info(event, queue_id=message.id, domain=claims[0].domain, relay=relay, **fields)
        if message.body is None and any(o.verdict is Verdict.BOUNCED for o in outcomes):
            # A bounce's DSN quotes the message: a large body not sent is read for it.
            message = replace(message, body=await self._body(message.id))
        notices = self.notices(message, claims, outcomes, where, dsn_supported)
        await self._store(results, notices)

    async def _store(self, results: Sequence[Result], notices: Sequence[NewMessage]) -> None:
        """Record results with their DSNs; if the database cannot take them now (a
        restart, a fail-over), keep them and record them before claiming again: a
        delivered recipient given back to the queue would be sent twice.  They stay
        ``sending`` under this node's name meanwhile, which no other node takes over
        while this node's heartbeat lives."""
        self._recording += len(results)
        try:
            await self.store.record(self.owner, results, notices)
        except Exception as error:
            log.warning("results_unrecorded", recipients=len(results), error=str(error))
            self._unrecorded.append((results, notices))
        finally:
            self._recording -= len(results)

    async def record_unrecorded(self) -> None:
        """Record the results kept while the database was out of reach, oldest first;
        stop at the first failure (the rest wait for the next try)."""
        async with self._recording_late:
            await self._record_unrecorded()

    async def _record_unrecorded(self) -> None:
        while self._unrecorded:
            results, notices = self._unrecorded[0]
            try:
                await self.store.record(self.owner, results, notices)
            except Exception as error:
                log.warning("results_unrecorded", recipients=len(results), error=str(error))
                return
            self._unrecorded.pop(0)
            log.info("results_recorded_late", recipients=len(results))
