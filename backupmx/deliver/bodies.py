"""Large bodies in serve's memory: how many bytes of them the deliveries hold at once.

A claimed message's body comes with its claim only up to
`backupmx.queue.claims.EAGER_BODY_BYTES`; a larger one is read just before it is
sent, once `BodyBudget.room` has room for it: at most `LARGE_BODIES_BYTES` of such
bodies are in memory together, or one alone, whatever its size.  Sending a body
copies it once or twice more for a moment (the end-of-data line, the transport's
buffer while the primary reads slowly), so serve's peak for large mail is about
three times the budget, or three times the largest message: not a hundred of them,
as when every claimed body was read with its claim.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

LARGE_BODIES_BYTES = 16 * 1024 * 1024


class BodyBudget:
    def __init__(self, limit: int = LARGE_BODIES_BYTES) -> None:
        self.limit = limit
        self.held = 0  # bytes of the bodies let in and not yet let go
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def room(self, size: int) -> AsyncIterator[None]:
        """Wait until `size` more bytes fit in the budget (or nothing else is held), and
        hold them until the block ends.  A body read with its claim (`size` 0) takes no
        room: most messages pass here without touching the lock."""
        if size == 0:
            yield
            return
        async with self._changed:
            await self._changed.wait_for(lambda: self.held == 0 or self.held + size <= self.limit)
            self.held += size
        try:
            yield
        finally:
            async with self._changed:
                self.held -= size
                self._changed.notify_all()
