"""The intake: a child process that commits received messages to the queue store.

Theory of operation.  A session answers ``250`` only once its message and all
its recipients are committed (invariant 1 of docs/queue.md#invariants), so the
commit is on the path of every message.  Done by a thread of the receiving process it was the
limit of accept throughput: the thread and the event loop share the GIL, and
every return from SQLite or from fsync waited for the busy loop (10 KiB
messages, 10 sessions: a batch of four took 2.3 ms instead of 0.4 ms, and the
loop slowed down as much).  So, as Postfix's cleanup daemon writes queue files
in a process of its own, the intake runs in its own process and on the other
core: `Intake.commit` sends the message over a socket pair and awaits the
acknowledgement; the process writes everything that arrived since its last
commit in one transaction (group commit: one fsync per batch) and only then
acknowledges each message of the batch.

Wire format: `backupmx.link` frames.  To the
intake, a `NewMessage` whose body is in its `portable` form: the bytes of a
spool still in memory, or the path of the spool's unlinked temporary file
through ``/proc/<pid>/fd/<n>``, so a 50 MiB body is not copied through the
socket.  Back, ``(queue id, None)`` or ``(queue id, (storage full?, error))``.
The socket pair is private to the two processes.

Failure: one message that cannot be written must not fail the others of its
batch (they come from other clients).  So a failed batch is written again, one
message per transaction on one connection: each message that still fails is
logged (``message_write_failed`` with its session and queue id) and acknowledged
with its error, and its `commit` raises `IntakeError`, so that session alone
answers ``451``; nothing of a failed message is visible.  Full storage is not
retried: every message needs space alike, and a transaction each would only hold
back the ``452``s (`commit` raises `OSError(ENOSPC)`) while the disk stays full;
nor is the rest of the batch once the connection is lost.

The process ignores SIGTERM, SIGINT and SIGHUP (systemd signals the whole
control group): it leaves when the receiver closes the socket (or dies), after
the batch in hand.  It logs ``message_accepted`` for each message it commits.
If it dies, every waiting session gets `IntakeError` (``451``) and the next
message starts a new one.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import select
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime

import structlog
from sqlalchemy.engine import Engine

from backupmx import logs
from backupmx.link import frame, unframe
from backupmx.queue.database import open_writer_engine, storage_full
from backupmx.queue.inserter import Inserter
from backupmx.queue.records import NewMessage, utcnow
from backupmx.queue.writer import MAX_BATCH, MAX_BATCH_BYTES

log = structlog.get_logger("backupmx.queue")

RESTART_INTERVAL = 1.0  # seconds between starts of a failing intake process
START_TIMEOUT = 60.0  # seconds to open the store (a PostgreSQL connect included)
CLOSE_TIMEOUT = 30.0  # seconds the last batch may take at shutdown


class IntakeError(RuntimeError):
    """The intake process could not commit the message (or is gone)."""


# ---------------------------------------------------------------------- receiver side


class _Channel(asyncio.Protocol):
    """The receiver's end of the socket pair: acknowledgements resolve waiting commits."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: dict[str, asyncio.Future[None]] = {}
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inbox = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._inbox += data
        for ack in unframe(self._inbox):
            if ack is None:  # the process has opened the store
                self.ready.set_result(None)
                continue
            queue_id, failure = ack
            future = self.waiting.pop(queue_id, None)
            if future is None or future.done():
                continue
            if failure is None:
                future.set_result(None)
            elif failure[0]:
                future.set_exception(OSError(errno.ENOSPC, failure[1]))
            else:
                future.set_exception(IntakeError(failure[1]))

    def connection_lost(self, error: Exception | None) -> None:
        self.transport = None
        if not self.ready.done():
            self.ready.set_exception(IntakeError("the queue intake process exited at start-up"))
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(IntakeError("the queue intake process exited"))
        self.waiting.clear()


class Intake:
    """Starts the intake process and hands it messages (see the module docstring)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._channel: _Channel | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._started_at = -RESTART_INTERVAL
        self._starting = asyncio.Lock()

    async def start(self) -> None:
        async with self._starting:
            if self._channel is not None and self._channel.transport is not None:
                return
            now = time.monotonic()
            if now - self._started_at < RESTART_INTERVAL:
                raise IntakeError("the queue intake process is restarting")
            self._started_at = now
            self._reap()
            ours, theirs = socket.socketpair()
            with theirs:
                self._process = await asyncio.create_subprocess_exec(
                    *(
                        sys.executable,
                        "-m",
                        "backupmx.queue.intake",
                        str(theirs.fileno()),
                        self.url,
                        logs.level(),
                    ),
                    pass_fds=[theirs.fileno()],
                    stdin=subprocess.DEVNULL,
                )
            loop = asyncio.get_running_loop()
            _, self._channel = await loop.create_unix_connection(_Channel, sock=ours)
            try:
                await asyncio.wait_for(self._channel.ready, START_TIMEOUT)
            except TimeoutError:
                self._channel.transport.close()  # type: ignore[union-attr]
                raise IntakeError("the queue intake process did not start") from None

    async def commit(self, message: NewMessage) -> None:
        """Return once the message is committed; raise if it was not.  Its body must be
        in its `portable` form."""
        channel = self._channel
        if channel is None or channel.transport is None:
            await self.start()
            channel = self._channel
            assert channel is not None and channel.transport is not None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        channel.waiting[message.id] = future
        channel.transport.write(frame(message))
        await future

    async def close(self) -> None:
        """Let the process finish its batch and leave."""
        if self._channel is not None and self._channel.transport is not None:
            self._channel.transport.close()
        if self._process is not None:
            process, self._process = self._process, None
            try:
                await asyncio.wait_for(process.wait(), CLOSE_TIMEOUT)
            except TimeoutError:
                log.error("intake_killed", timeout=CLOSE_TIMEOUT)
                process.kill()
                await process.wait()

    def _reap(self) -> None:
        if self._process is not None and self._process.returncode is not None:
            log.error("intake_exited", status=self._process.returncode)
            self._process = None


# ---------------------------------------------------------------------- intake process


def run(channel: socket.socket, url: str) -> None:
    """Commit what arrives, batch by batch, until the receiver closes the socket."""
    engine = open_writer_engine(url)
    inserter = Inserter(engine.dialect)
    with engine.connect():
        channel.sendall(frame(None))
    inbox = bytearray()
    pending: list[NewMessage] = []
    while True:
        if pending:
            _drain(channel, inbox)
        elif not _receive(channel, inbox):
            return
        pending.extend(unframe(inbox))
        if not pending:
            continue
        count, size = 0, 0
        while count < len(pending) and count < MAX_BATCH and size < MAX_BATCH_BYTES:
            size += pending[count].size
            count += 1
        batch, pending = pending[:count], pending[count:]
        failures = _write(engine, inserter, batch, utcnow())
        channel.sendall(b"".join(frame((m.id, failures.get(m.id))) for m in batch))
        for message in batch:  # here, off the receiver's event loop
            if message.id not in failures:
                log.info(
                    "message_accepted",
                    session=message.session_id,
                    client=message.client_ip,
                    queue_id=message.id,
                    sender=message.sender,
                    size=message.size,
                    rcpts=len(message.recipients),
                )


Failure = tuple[bool, str]  # (storage full?, "ErrorType: text"), as acknowledged


def _failure(error: Exception) -> Failure:
    return storage_full(error), f"{type(error).__name__}: {error}"


def _failed(message: NewMessage, error: Exception) -> Failure:
    """Log that `message` alone could not be written: its session answers 451."""
    log.error(
        "message_write_failed", session=message.session_id, queue_id=message.id, error=str(error)
    )
    return _failure(error)


def _write(
    engine: Engine, inserter: Inserter, batch: list[NewMessage], now: datetime
) -> dict[str, Failure]:
    """Commit `batch` in one transaction or, if that fails, each message in its own; the
    failures by queue id (see the module docstring)."""
    try:
        with engine.begin() as conn:
            inserter.insert(conn, batch, now)
        return {}
    except Exception as error:
        if len(batch) == 1:
            return {batch[0].id: _failed(batch[0], error)}
        log.error("batch_write_failed", messages=len(batch), error=str(error))
        if storage_full(error):
            return {message.id: _failure(error) for message in batch}
    failures: dict[str, Failure] = {}
    decided = 0
    try:
        with engine.connect() as conn:
            for message in batch:
                try:
                    with conn.begin():
                        inserter.insert(conn, [message], now)
                except Exception as error:
                    failures[message.id] = _failed(message, error)
                    if conn.invalidated:  # the database, not the message: stop here
                        raise
                decided += 1
    except Exception as error:  # no connection: the rest fails with the database's error
        failures |= {message.id: _failure(error) for message in batch[decided:]}
    return failures


def _receive(channel: socket.socket, inbox: bytearray) -> bool:
    """Wait for data, then take all that is there; False at end of file."""
    chunk = channel.recv(1 << 20)
    if not chunk:
        return False
    inbox += chunk
    _drain(channel, inbox)
    return True


def _drain(channel: socket.socket, inbox: bytearray) -> None:
    """Add whatever arrived meanwhile, without waiting."""
    while select.select([channel], [], [], 0)[0]:
        chunk = channel.recv(1 << 20)
        if not chunk:
            return
        inbox += chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fd", type=int)
    parser.add_argument("url")
    parser.add_argument("log_level")
    args = parser.parse_args()
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    logs.configure(args.log_level)
    channel = socket.socket(fileno=args.fd)
    with channel:
        run(channel, args.url)


if __name__ == "__main__":
    main()
