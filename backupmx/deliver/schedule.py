"""When a deferred recipient is tried again, and when the queue gives up on it.

Pure.  After attempt n the wait is retry_min·2^(n-1), capped at retry_max, with
±10 % jitter so that recipients deferred together do not come due together.
This paces recipients a *reachable* primary deferred; a primary that was down
is retried when its probe succeeds (`primaries`), not when backoff says so.

Expiry and the delay warning count from when the message was received, not from
any attempt: the housekeeping job sweeps the pending recipients of messages
received before `expires_before` (expired, with a DSN) and `warns_before`.
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


def expires_before(now: datetime, max_queue_lifetime: float) -> datetime:
    """Mail received before this moment has outlived ``max_queue_lifetime``."""
    return now - timedelta(seconds=max_queue_lifetime)


def warns_before(now: datetime, delay_warning: float) -> datetime | None:
    """Mail received before this moment and still pending earns its sender a delay
    warning; None when ``delay_warning`` is 0 (off, Postfix's default)."""
    return now - timedelta(seconds=delay_warning) if delay_warning > 0 else None
