"""Per-primary-host pacing: a concurrency window fed back by delivery results, and a rate cap.

Like Postfix's ``qmgr_feedback.c``, each result nudges the host's window: a
success adds ``1/window`` (one more connection per window's worth of successes,
so growth is linear per round), a ``421``, a ``4xx`` to MAIL or DATA, or a
timeout halves it.  The window starts at ``initial_connections_per_host`` and
never exceeds ``max_connections_per_host``, so a primary that just came back
sees a ramp, not a stampede of every held message at once.  A token bucket caps
messages per second (0: no cap).

Several nodes sharing the queue share each host's budget: with ``live`` nodes,
each node's pacers allow ``max_connections_per_host // live`` connections (at
least one) and ``1/live`` of the rate, and start from ``1/live`` of the initial
window (`Pacers.share`, fed by `backupmx.deliver.membership`), so the primary
sees the cluster's limits.  Connections kept open between messages count: a
host's idle connections never outnumber its free slots (`HostPacer.keeps_idle`).

A pacer lives while its host is in use, and afterwards among the `MAX_PACED_HOSTS`
most recently used; an older idle one is forgotten, and its host starts again from
the initial window, as a host never seen.

Everything here runs on the event loop; nothing blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import structlog

log = structlog.get_logger("backupmx.deliver")

# Pacers kept, at most, beyond those of hosts with a delivery in progress.  DSNs go to
# the senders' MX hosts, so the hosts seen grow with the mail; a window learned from a
# host that a thousand others have been used after is stale anyway (Postfix's qmgr
# drops a destination's queue once it is empty).
MAX_PACED_HOSTS = 1000


class HostPacer:
    def __init__(self, host: str, initial: int, maximum: int, rate: float) -> None:
        self.host = host
        self.maximum = max(maximum, 1)
        self.window = float(min(max(initial, 1), self.maximum))
        self.active = 0
        self.users = 0  # deliveries holding or waiting for a slot: not to be forgotten
        self.rate = rate
        self._tokens = float(rate)
        self._refilled = time.monotonic()
        self._changed = asyncio.Condition()

    @property
    def limit(self) -> int:
        return max(int(self.window), 1)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the host's connection slots."""
        self.users += 1
        try:
            async with self._changed:
                await self._changed.wait_for(lambda: self.active < self.limit)
                self.active += 1
            try:
                yield
            finally:
                async with self._changed:
                    self.active -= 1
                    # Wake only as many waiters as there are free slots: with thousands of
                    # messages waiting, notify_all cost most of a flush's CPU.
                    self._changed.notify(self.limit - self.active)
        finally:
            self.users -= 1

    async def message_token(self) -> None:
        """Wait until the rate cap allows one more message to this host."""
        if self.rate <= 0:
            return
        while True:
            now = time.monotonic()
            self._tokens = min(float(self.rate), self._tokens + (now - self._refilled) * self.rate)
            self._refilled = now
            if self._tokens >= 1:
                self._tokens -= 1
                return
            await asyncio.sleep((1 - self._tokens) / self.rate)

    def keeps_idle(self, idle: int) -> bool:
        """Whether a connection whose message is done may stay open for the next one,
        with `idle` others of this host already waiting: open connections (busy and
        idle) stay within the window."""
        return self.active - 1 + idle < self.limit

    def limit_to(self, maximum: int, rate: float) -> None:
        """A new share of the host's budget (nodes joined or left the cluster)."""
        self.maximum = max(maximum, 1)
        self.rate = rate
        self._tokens = min(self._tokens, float(rate))
        if self.window > self.maximum:
            self._set(float(self.maximum))
        elif int(self.window) < self.maximum:
            asyncio.get_running_loop().create_task(self._wake())

    def success(self) -> None:
        self._set(min(self.window + 1 / self.window, float(self.maximum)))

    def congestion(self) -> None:
        self._set(max(self.window / 2, 1.0))

    def _set(self, window: float) -> None:
        before = int(self.window)
        self.window = window
        if int(window) != before:
            log.info("pacer_window", host=self.host, connections=int(window), was=before)
        if int(window) > before:
            asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        async with self._changed:
            self._changed.notify(max(self.limit - self.active, 0))


class Pacers:
    """One `HostPacer` per primary host address, created on first use; at most
    `MAX_PACED_HOSTS` of them, and those of the hosts in use."""

    def __init__(self, initial: int, maximum: int, rate: int) -> None:
        self._budget = (initial, maximum, rate)  # the cluster's, per host
        self._nodes = 1
        self._by_host: dict[str, HostPacer] = {}  # least recently used first

    def __getitem__(self, host: str) -> HostPacer:
        pacer = self._by_host.pop(host, None)
        if pacer is None:
            self._forget_idle()
            initial, maximum, rate = self._share()
            pacer = HostPacer(host, initial, maximum, rate)
        self._by_host[host] = pacer
        return pacer

    def share(self, nodes: int) -> bool:
        """`nodes` live nodes share each host's budget from now on; True if that changed."""
        nodes = max(nodes, 1)
        if nodes == self._nodes:
            return False
        self._nodes = nodes
        _, maximum, rate = self._share()
        log.info("pacer_share", nodes=nodes, connections_per_host=maximum, rate_per_host=rate)
        for pacer in self._by_host.values():
            pacer.limit_to(maximum, rate)
        return True

    def _share(self) -> tuple[int, int, float]:
        initial, maximum, rate = self._budget
        return max(initial // self._nodes, 1), max(maximum // self._nodes, 1), rate / self._nodes

    def _forget_idle(self) -> None:
        """Make room for one more pacer: the least recently used idle ones go."""
        excess = len(self._by_host) + 1 - MAX_PACED_HOSTS
        idle: list[str] = []
        for host, pacer in self._by_host.items():
            if len(idle) >= excess:
                break
            if pacer.users == 0:
                idle.append(host)
        for host in idle:
            del self._by_host[host]

    def windows(self) -> dict[str, float]:
        return {host: p.window for host, p in self._by_host.items()}
