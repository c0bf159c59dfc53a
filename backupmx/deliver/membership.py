"""This node among the nodes sharing the queue: its heartbeat, its fence, its share.

Why leases follow the node, not the recipient.  A node may hold hundreds of
recipients while a slow primary takes a second per message; a lease per recipient
must then be renewed row by row, or it runs out under a node that is merely slow
and another node sends the same mail.  Here a node's heartbeat (one row, every
``lease / HEARTBEATS_PER_LEASE`` seconds) renews all its leases at once, and a
node is dead only when its heartbeat is older than the lease
(`backupmx.queue.nodes`).  A slow node keeps its work however long a send takes;
a killed one's work is given back by the next heartbeat of any live node after
the lease, seconds rather than minutes.

The fence.  A node that cannot write its heartbeat (paused by ``SIGSTOP``, its
database out of reach) may be taken for dead by the others, who then give its
recipients back and send them.  So a node sends a message only while its last
heartbeat *began* less than ``FENCE × lease`` ago (`holds`), checked right before
each send, and only for claims made since its last lapse (`epoch`): a process
continued after a pause finds its fence fallen before it writes to any primary.
When the fence falls (`lapse`) the deliverer starts no send and claims
nothing; a send already under way is not cut (its message has usually left
already: what remains is the primary's reply), so that its result reaches the
store, which records it only if the recipient is still this node's and logs it
otherwise.  The next heartbeat that succeeds gives this node's own leases back
to the queue before it claims again.  The margin, a third of the lease,
covers clock-rate differences and the time between the check and the send; a
reply to a message already sent when the node stopped can still come back after
another node has sent it again: RFC 5321 §6.1's duplicate, which the store
refuses to record and logs (``result_after_lease_lost``).

Shares.  Each live node uses ``1/live`` of each primary's connection and rate
budget (`backupmx.deliver.pacer.Pacers.share`), so the primary sees the
cluster's limit, not one per node.  A dead node still counts until its heartbeat
is older than the lease: for that long the survivors deliver within their old
share, never above the limit.  A node that joins a cluster waits one heartbeat
interval before it delivers, so that the others have counted it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import timedelta

import structlog

from backupmx import metrics
from backupmx.queue.nodes import NodeReport
from backupmx.queue.store import Store

log = structlog.get_logger("backupmx.deliver")

HEARTBEATS_PER_LEASE = 6
FENCE = 2 / 3  # of the lease: a node sends only while its last heartbeat is this recent
RATE_WINDOW = 60.0  # seconds over which the delivery rate in `backupmx nodes` is taken


class Membership:
    def __init__(
        self,
        store: Store,
        name: str,
        lease: float,
        describe: Callable[[], NodeReport],
    ) -> None:
        self.store = store
        self.name = name
        self.lease = lease
        self.interval = lease / HEARTBEATS_PER_LEASE
        self.describe = describe  # this node's report, with its counters of the moment
        self.live: tuple[str, ...] = (name,)
        self.epoch = 0  # one more at each lapse: claims of an earlier epoch are not sent
        # What the deliverer and the pacers do on news (set by the application).
        self.on_lapse: Callable[[], None] = lambda: None
        self.on_live: Callable[[int], None] = lambda count: None
        self.on_taken_over: Callable[[], None] = lambda: None
        self.before_give_back: Callable[[], Awaitable[None]] = _nothing
        self._renewed: float | None = None  # monotonic start of the last good heartbeat
        self._lapsed = False
        self._delivered: deque[tuple[float, int]] = deque()

    def holds(self, epoch: int | None = None) -> bool:
        """Whether this node may send (for claims of `epoch`): see the module docstring."""
        if self._lapsed or (epoch is not None and epoch != self.epoch):
            return False
        return self._renewed is not None and time.monotonic() - self._renewed < FENCE * self.lease

    def others(self) -> tuple[str, ...]:
        """The other live nodes, as of the last heartbeat."""
        return tuple(n for n in self.live if n != self.name)

    async def join(self) -> None:
        """Give back what this name held before (a crash), register, take the first
        heartbeat."""
        given_back = await self.store.give_back_leases(self.name)
        if given_back:
            log.info("leases_reclaimed", recipients=given_back)
        await self.store.register(self.describe())
        await self.beat()

    async def counted(self) -> None:
        """Return once the other live nodes have counted this one (their next heartbeat),
        so that their shares and this node's add up to the budget before it delivers."""
        if self.others():
            await asyncio.sleep(self.interval * 1.5)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            beat = asyncio.get_running_loop().create_task(self.beat())
            # A heartbeat stuck on a database out of reach must not keep the fence up.
            while not beat.done():
                await asyncio.wait({beat}, timeout=self.interval)
                if not beat.done() and not self.holds() and not self._lapsed:
                    self.lapse("no heartbeat written for two thirds of the lease")

    async def beat(self) -> None:
        started = time.monotonic()
        lease = timedelta(seconds=self.lease)
        try:
            live = await self.store.heartbeat(self.describe(), lease)
        except Exception as error:
            log.warning("heartbeat_failed", node=self.name, error=str(error))
            if not self.holds() and not self._lapsed:
                self.lapse("no heartbeat written for two thirds of the lease")
            metrics.heartbeat(len(self.live), self.holds(), 0)
            return
        if not self.holds() and not self._lapsed and self._renewed is not None:
            # This heartbeat went through, but the last one is too old: the process
            # was stopped, or its loop blocked.  Others may have taken its work.
            self.lapse("the last heartbeat is older than two thirds of the lease")
        if self._lapsed:
            try:
                await self.before_give_back()  # results learnt before the lapse, if any
                given_back = await self.store.give_back_leases(self.name)
            except Exception as error:
                log.warning("heartbeat_failed", node=self.name, error=str(error))
                return
            log.info("fence_regained", node=self.name, given_back=given_back)
            self._lapsed = False
        self._renewed = started
        if live != self.live:
            log.info("nodes_live", node=self.name, live=list(live))
        self.live = live
        self.on_live(len(live))
        try:
            taken_over = await self.store.take_over(self.name, live, lease)
        except Exception as error:  # the next heartbeat tries again
            log.warning("take_over_failed", node=self.name, error=str(error))
            taken_over = {}
        for node, count in taken_over.items():
            log.warning("leases_taken_over", node=node, recipients=count, by=self.name)
        if taken_over:
            self.on_taken_over()
        metrics.heartbeat(len(live), True, sum(taken_over.values()))

    def lapse(self, why: str) -> None:
        """The fence fell: stop sending now, and claim nothing until a heartbeat is written."""
        self._lapsed = True
        self.epoch += 1
        metrics.heartbeat(len(self.live), False, 0)
        log.error("fence_lost", node=self.name, reason=why)
        self.on_lapse()

    async def leave(self) -> None:
        """A clean stop: the deliverer has stopped; give its leases back, mark the row."""
        await self.store.give_back_leases(self.name)
        await self.store.stopped(self.name)

    def delivery_rate(self, delivered: int) -> float:
        """Messages per second over the last `RATE_WINDOW`, from the running count."""
        now = time.monotonic()
        self._delivered.append((now, delivered))
        while len(self._delivered) > 1 and now - self._delivered[0][0] > RATE_WINDOW:
            self._delivered.popleft()
        first_at, first = self._delivered[0]
        return (delivered - first) / (now - first_at) if now > first_at else 0.0


async def _nothing() -> None:
    pass
