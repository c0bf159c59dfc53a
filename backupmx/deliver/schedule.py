"""When a deferred recipient is tried again: exponential backoff between two bounds.

Pure.  After attempt n the wait is retry_min·2^(n-1), capped at retry_max, with
±10 % jitter so that recipients deferred together do not come due together.
This paces recipients a *reachable* primary deferred; a primary that was down
is retried when its probe succeeds (`primaries`), not when backoff says so.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta


def backoff(
    attempts: int, retry_min: float, retry_max: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait after the given number of attempts (1 = the first try failed)."""
    base = retry_min * 2 ** max(attempts - 1, 0) if attempts < 64 else retry_max
    wait = min(base, retry_max)
    jitter = (rng or random).uniform(0.9, 1.1)
    return min(max(wait * jitter, retry_min), retry_max)


def next_attempt(
    now: datetime,
    attempts: int,
    retry_min: float,
    retry_max: float,
    rng: random.Random | None = None,
) -> datetime:
    return now + timedelta(seconds=backoff(attempts, retry_min, retry_max, rng))


def expired(received_at: datetime, now: datetime, max_queue_lifetime: float) -> bool:
    return (now - received_at).total_seconds() >= max_queue_lifetime
