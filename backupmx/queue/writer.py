"""The deliverer's writes: one thread takes turns at the queue, and group commit.

`DeliveryWrites` runs the transactions of this process's deliveries — claims,
the bodies they need, and batches of results — one after the other, in one
thread on one plain (not asyncio) connection.  SQLite has one writer at a time,
and every transaction takes the write lock first (``BEGIN IMMEDIATE``,
`backupmx.queue.database`); one that finds the file locked sleeps in SQLite's
busy handler, 1, 2, 5, 10 … ms at a time.  Claims and result batches on
separate connections measured seconds of such sleeps per 10,000-message flush,
with the connections to the primary idle meanwhile; taken in turn, none ever
waits on another's lock (other processes — intake, CLI — still can, briefly).
Claims and the bodies they need go ahead of the result batches waiting (`Turns`):
the connections to the primary wait for a claim, while a result batch only keeps
its own messages' tasks waiting.  In a flush a claim used to wait behind one or two
batches of results, and a quarter of the time no connection had anything to send.
Without the thread (the CLI, a store that was never started) the same work
runs on the asyncio engine.

Group commit: `GroupCommitWriter` turns many callers' items into one
transaction.  Each caller hands its item (the delivery results of one
message) to `GroupCommitWriter.submit` and waits; the writer takes everything
that is waiting (up to `MAX_BATCH` items and `MAX_BATCH_BYTES`), writes it in
one transaction — one fsync for the batch — and only then resolves every
caller's wait.  When few items wait, it lingers `LINGER_SECONDS` for more
first: results come one message at a time, and batches of one or two cost a
transaction each (six statements and an fsync): 2.2 s of the writer's CPU per
10,000-message flush, 1.4 s with the linger.  Nobody waits for a result to be written but the
message's own task, which holds no connection by then.  Received mail is
committed the same way, by the intake process (`backupmx.queue.intake`).

On failure every item of the batch gets the exception; nothing is retried
here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, Protocol, TypeVar

import structlog
from sqlalchemy.engine import Connection, Engine

from backupmx.queue.database import QueueDatabase, open_writer_engine

log = structlog.get_logger("backupmx.queue")

# The bounds of one group commit, for both writers (this one and the intake
# process).  Constants, not settings: a batch is whatever is waiting, so under
# load it grows on its own and these are never the limit of throughput; they
# only bound what one transaction holds in memory (every body of the batch is
# read in whole) and how long the last caller of a huge batch waits.
MAX_BATCH = 256  # items per transaction
MAX_BATCH_BYTES = 32 * 1024 * 1024  # body bytes per transaction
# How long the results writer waits for more when fewer than `GATHERED` items are
# waiting: a few milliseconds of a result's way to the disk, for batches of ten or more
# in a flush (a message takes about that long to send).
LINGER_SECONDS = 0.005
GATHERED = 16

R = TypeVar("R")


class DeliveryWrites(QueueDatabase):
    """The thread and the plain connection the deliveries' transactions take turns on."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._writer_engine: Engine | None = None
        self._turns: Turns | None = None

    def _start_writes(self) -> None:
        self._writer_engine = open_writer_engine(self.url)
        self._turns = Turns()

    def _stop_writes(self) -> None:
        turns, self._turns = self._turns, None
        engine, self._writer_engine = self._writer_engine, None
        if turns is not None:
            turns.stop()
        if engine is not None:
            engine.dispose()

    async def _in_turn(self, work: Callable[[Connection], R], first: bool = False) -> R:
        """`work` in one transaction of its own, in its turn; its result.  `first`: ahead
        of the result batches waiting (claims and their bodies: connections wait for
        those, while results only wait to be written)."""
        turns, engine = self._turns, self._writer_engine
        if turns is None or engine is None:
            async with self.engine.begin() as conn:
                return await conn.run_sync(work)

        def transaction() -> R:
            with engine.begin() as conn:
                return work(conn)

        return await turns.run(transaction, first)


class Turns:
    """One thread that runs callables one at a time, those asked `first` before the
    others, each in the order asked."""

    def __init__(self) -> None:
        self._waiting: queue.PriorityQueue[tuple[int, int, Callable[[], None] | None]] = (
            queue.PriorityQueue()
        )
        self._order = itertools.count()
        self._thread = threading.Thread(target=self._serve, name="queue-writer", daemon=True)
        self._thread.start()

    async def run(self, work: Callable[[], R], first: bool) -> R:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[R] = loop.create_future()

        def turn() -> None:
            try:
                result = work()
            except BaseException as error:
                loop.call_soon_threadsafe(_settle, done, None, error)
            else:
                loop.call_soon_threadsafe(_settle, done, result, None)

        self._waiting.put((0 if first else 1, next(self._order), turn))
        return await done

    def stop(self) -> None:
        """Run what is waiting, then end the thread."""
        self._waiting.put((2, next(self._order), None))
        self._thread.join()

    def _serve(self) -> None:
        while True:
            _, _, turn = self._waiting.get()
            if turn is None:  # asked by `stop`, after everything else
                return
            turn()


def _settle(done: asyncio.Future[R], result: R | None, error: BaseException | None) -> None:
    if done.cancelled():
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)  # type: ignore[arg-type]


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
            if self._waiting.qsize() < GATHERED:
                await asyncio.sleep(LINGER_SECONDS)
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
