"""Per-primary-host pacing: a concurrency window fed back by delivery results, and a rate cap.

Like Postfix's ``qmgr_feedback.c``, each result nudges the host's window: a
success adds ``1/window`` (one more connection per window's worth of successes,
so growth is linear per round), a ``421``, a ``4xx`` to MAIL or DATA, a refused
connection or a timeout halves it.  The window starts at
``initial_connections_per_host`` and never exceeds ``max_connections_per_host``,
so a primary that just came back sees a ramp, not a stampede of every held
message at once.  A token bucket caps messages per second (0: no cap).

The window learns the primary's limit, as TCP's congestion avoidance does after a
loss (its ``ssthresh``): a failure while ``level`` connections to the host were
open makes ``level`` the window's *ceiling*, if the host was delivering: two or
more connections open (one alone says nothing about how many the host takes),
and a message delivered since the last failure (failures in a row are a host
that is down or overloaded, not a limit of sessions).  Successes grow the window
back as before, but only up to ``ceiling - 1``, the most that worked; there it
stays for `PROBE_AFTER` seconds, then tries the ceiling once more (a probe
upwards: the primary's limit may have been raised).  A probe that fails doubles
the wait before the next (up to `MAX_PROBE_AFTER`); one that lasts `PROBE_AFTER`
seconds without a failure lifts the ceiling, and the window grows on as before.
Against a primary that takes 4 sessions and answers ``421`` to a fifth, that is
one refusal to find the limit and then one per probe (5, 10, 20 … s apart), not
one every few messages.  The arithmetic is the pure `delivered` and `congested`
over a `Window`; `HostPacer` applies them.

Several nodes sharing the queue share each host's budget: with ``live`` nodes,
each node's pacers allow ``max_connections_per_host // live`` connections (at
least one) and ``1/live`` of the rate, and start from ``1/live`` of the initial
window (`Pacers.share`, fed by `backupmx.deliver.membership`), so the primary
sees the cluster's limits.  The window stays within that share whatever its
ceiling.  Connections kept open between messages count: a host's idle
connections never outnumber its free slots (`HostPacer.keeps_idle`).

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
from dataclasses import dataclass, replace

import structlog

log = structlog.get_logger("backupmx.deliver")

# Pacers kept, at most, beyond those of hosts with a delivery in progress.  DSNs go to
# the senders' MX hosts, so the hosts seen grow with the mail; a window learned from a
# host that a thousand others have been used after is stale anyway (Postfix's qmgr
# drops a destination's queue once it is empty).
MAX_PACED_HOSTS = 1000
# Seconds the window stays just below its ceiling before it tries the ceiling again,
# and that a probe must last without a failure to lift it.  Not settings: every probe
# that fails costs the primary one refused session, so the waits only decide how
# gently a raised limit is found; each failed probe doubles the wait, up to
# MAX_PROBE_AFTER (a primary whose limit holds sees one probe in five minutes).
PROBE_AFTER = 5.0
MAX_PROBE_AFTER = 300.0


@dataclass(frozen=True)
class Window:
    """A host's concurrency window, as its results left it."""

    size: float  # connections allowed: the integer part, at least 1
    ceiling: int | None = None  # connections that failed last (TCP's ssthresh); None: none
    probe_at: float = 0.0  # (monotonic) when the ceiling is tried, or a probe of it lifts it
    patience: float = PROBE_AFTER  # the wait before the next probe of this ceiling
    answered: bool = False  # a message was delivered since the last failure

    @property
    def limit(self) -> int:
        return max(int(self.size), 1)


def delivered(window: Window, maximum: int, now: float) -> Window:
    """A message delivered at `now`: the window grows by ``1/size`` up to `maximum`,
    and with a ceiling, up to ``ceiling - 1``; there, once `probe_at` has come, it
    tries the ceiling; a probe that lasted until `probe_at` lifts the ceiling."""
    grown = window.size + 1 / window.size
    if window.ceiling is None:
        return replace(window, size=min(grown, maximum), answered=True)
    if window.size < window.ceiling - 1:
        return replace(window, size=min(grown, window.ceiling - 1, maximum), answered=True)
    if window.size >= maximum or now < window.probe_at:
        return replace(window, answered=True)
    if window.size < window.ceiling:
        return replace(
            window, size=float(window.ceiling), probe_at=now + PROBE_AFTER, answered=True
        )
    return Window(min(grown, maximum), answered=True)


def congested(window: Window, level: int, now: float) -> Window:
    """A refusal, a ``4xx`` to MAIL or DATA or a timeout at `now`, with `level`
    connections to the host open (the failing one included): the window halves, and
    `level` becomes its ceiling if the host was delivering (a message delivered since
    the last failure) on other connections (two or more open).  Failing at the same
    ceiling again (a failed probe) doubles the wait before the next probe."""
    size = max(window.size / 2, 1.0)
    if level < 2 or not window.answered:
        return replace(window, size=size, answered=False)
    failed_probe = level == window.ceiling
    patience = min(window.patience * 2, MAX_PROBE_AFTER) if failed_probe else PROBE_AFTER
    return Window(size, level, now + patience, patience)


class HostPacer:
    def __init__(self, host: str, initial: int, maximum: int, rate: float) -> None:
        self.host = host
        self.maximum = max(maximum, 1)
        self._window = Window(float(min(max(initial, 1), self.maximum)))
        self.active = 0
        self.users = 0  # deliveries holding or waiting for a slot: not to be forgotten
        self.rate = rate
        self._tokens = float(rate)
        self._refilled = time.monotonic()
        self._changed = asyncio.Condition()

    @property
    def window(self) -> float:
        return self._window.size

    @property
    def ceiling(self) -> int | None:
        return self._window.ceiling

    @property
    def limit(self) -> int:
        return self._window.limit

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
        if self._window.size > self.maximum:
            self._set(replace(self._window, size=float(self.maximum)))
        elif self.limit < self.maximum:
            asyncio.get_running_loop().create_task(self._wake())

    def success(self) -> None:
        self._set(delivered(self._window, self.maximum, time.monotonic()))

    def congestion(self) -> None:
        """Feedback from within a slot: the connections open include the failing one."""
        self._set(congested(self._window, self.active, time.monotonic()))

    def _set(self, window: Window) -> None:
        before, self._window = self._window, window
        if window.limit != before.limit:
            log.info(
                "pacer_window",
                host=self.host,
                connections=window.limit,
                was=before.limit,
                ceiling=window.ceiling,
            )
        if window.limit > before.limit:
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
