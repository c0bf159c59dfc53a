"""The per-client counts every receiver worker shares: open connections and rates.

Like Postfix's ``anvil`` server, one object in the serve process keeps them, so
the limits hold exactly however many receiver workers take connections: a client
with ``max_connections_per_ip`` sessions open gets ``421`` for the next one on
any worker, and ``max_messages_per_minute_per_ip`` counts its messages on all of
them.  The workers ask over their link (`backupmx.receive.workers`).

Seats are named by the session's id, so that giving one back is exact and
idempotent: a session that ends while its admission is still on its way gives
back nothing twice, and a PROXY header moves the seat to the real client's
address.  A worker that dies gives back all its seats (`receiver_gone`).  Once
serve begins to stop, every admission is refused with ``421 4.3.2``, also by a
worker that has not yet seen its own SIGTERM.

Everything here is plain, in-memory and synchronous; the decision itself is
`backupmx.receive.admission.refusal`.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from backupmx.config import Limits
from backupmx.receive import admission

RATE_WINDOW = 60.0  # the limits are "per minute"
# Buckets kept at most, (kind, client IP) each: about 30 MB.  A bucket untouched for
# RATE_WINDOW is full again and is dropped at once; past this bound the longest
# untouched goes too, so a flood from more addresses than this in a minute (IPv6
# makes that cheap) resets the oldest counts rather than growing the process.
MAX_TRACKED_CLIENTS = 100_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class ClientRates:
    """Token buckets per (kind, client IP): `limit` per minute, bursts up to `limit`.

    Like Postfix's anvil, but a bucket rather than fixed minutes, so a client cannot
    send twice the limit across a minute's boundary.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Least recently touched first (each take moves its bucket to the end), so
        # the idle ones are found at the front.  At most MAX_TRACKED_CLIENTS.
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, kind: str, client_ip: str, limit: int, count: int = 1) -> bool:
        """Count `count` events; False (and nothing counted) if that goes past `limit`."""
        if limit <= 0:
            return True
        now = self._clock()
        self._forget_idle(now)
        key = (kind, client_ip)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED_CLIENTS:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = _Bucket(float(limit), now)
        else:
            self._buckets.move_to_end(key)
        bucket.tokens = min(
            float(limit), bucket.tokens + (now - bucket.updated) * limit / RATE_WINDOW
        )
        bucket.updated = now
        if bucket.tokens < count:
            return False
        bucket.tokens -= count
        return True

    def _forget_idle(self, now: float) -> None:
        """A bucket untouched for a whole window is full again: it carries no state."""
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if now - oldest.updated < RATE_WINDOW:
                return
            self._buckets.popitem(last=False)


class Anvil:
    """Open connections in total and per client address, by worker and seat; and the
    per-client rate buckets."""

    def __init__(self, limits: Callable[[], Limits], clock: Callable[[], float] = time.monotonic):
        self._limits = limits  # the running configuration's (a reload changes them)
        self.rates = ClientRates(clock)
        self._seats: dict[tuple[int, str], str] = {}  # (worker, seat) -> client address
        self._per_ip: Counter[str] = Counter()
        self.draining = False  # serve is stopping: every new connection gets 421 4.3.2

    @property
    def open(self) -> int:
        return len(self._seats)

    def open_from(self, client_ip: str) -> int:
        return self._per_ip[client_ip]

    def admit(self, worker: int, seat: str, client_ip: str) -> str | None:
        """Count one more connection; the refusal reply instead if it is over a limit."""
        self.leave(worker, seat)
        refusal = admission.refusal(
            self._limits(), self.draining, len(self._seats), self._per_ip[client_ip]
        )
        if refusal is None:
            self._seats[(worker, seat)] = client_ip
            self._per_ip[client_ip] += 1
        return refusal

    def leave(self, worker: int, seat: str) -> None:
        client_ip = self._seats.pop((worker, seat), None)
        if client_ip is None:
            return
        self._per_ip[client_ip] -= 1
        if self._per_ip[client_ip] <= 0:
            del self._per_ip[client_ip]

    def take(self, kind: str, client_ip: str, limit: int) -> bool:
        return self.rates.take(kind, client_ip, limit)

    def receiver_gone(self, worker: int) -> int:
        """Give back every seat of a worker that exited; how many there were."""
        seats = [key for key in self._seats if key[0] == worker]
        for _, seat in seats:
            self.leave(worker, seat)
        return len(seats)
