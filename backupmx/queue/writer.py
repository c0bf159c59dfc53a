"""Group commit: one writer task turns many callers' items into one transaction.

Each caller hands its item (the delivery results of one connection) to
`GroupCommitWriter.submit` and waits; the writer takes everything that is
waiting (up to `MAX_BATCH` items and `MAX_BATCH_BYTES`), writes it in one
transaction — one fsync for the batch — and only then resolves every caller's
wait.  Received mail is committed the same way, by the intake process
(`backupmx.queue.intake`).

On failure every item of the batch gets the exception; nothing is retried
here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, Protocol, TypeVar

import structlog

log = structlog.get_logger("backupmx.queue")

# The bounds of one group commit, for both writers (this one and the intake
# process).  Constants, not settings: a batch is whatever is waiting, so under
# load it grows on its own and these are never the limit of throughput; they
# only bound what one transaction holds in memory (every body of the batch is
# read in whole) and how long the last caller of a huge batch waits.
MAX_BATCH = 256  # items per transaction
MAX_BATCH_BYTES = 32 * 1024 * 1024  # body bytes per transaction


class Sized(Protocol):
    @property
    def size(self) -> int: ...


T = TypeVar("T", bound=Sized)


class GroupCommitWriter(Generic[T]):
    def __init__(self, write_batch: Callable[[Sequence[T]], Awaitable[None]]) -> None:
        self._write_batch = write_batch
        self._waiting: asyncio.Queue[tuple[T, asyncio.Future[None]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def submit(self, item: T) -> None:
        """Return once `item` is committed; raise what the commit raised."""
        if self._task is None or self._task.done():
            raise RuntimeError("the queue writer is not running")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.put_nowait((item, future))
        await asyncio.shield(future)

    async def _run(self) -> None:
        while True:
            batch = [await self._waiting.get()]
            size = batch[0][0].size
            while not self._waiting.empty() and len(batch) < MAX_BATCH and size < MAX_BATCH_BYTES:
                batch.append(self._waiting.get_nowait())
                size += batch[-1][0].size
            try:
                await self._write_batch([item for item, _ in batch])
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as error:
                log.error("batch_write_failed", messages=len(batch), error=str(error))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
