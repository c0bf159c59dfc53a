"""The intake: one child process of serve that commits every received message.

Theory of operation.  A session answers ``250`` only once its message and all
its recipients are committed (invariant 1 of docs/queue.md#invariants), so the
commit is on the path of every message.  Done by a thread of the receiving process it was the
limit of accept throughput: the thread and the event loop share the GIL, and
every return from SQLite or from fsync waited for the busy loop (10 KiB
messages, 10 sessions: a batch of four took 2.3 ms instead of 0.4 ms, and the
loop slowed down as much).  So, as Postfix's cleanup daemon writes queue files
in a process of its own, the intake runs in its own process: each receiver
worker's `IntakeClient.commit` sends the message over a Unix socket and awaits
the acknowledgement; the process writes everything that arrived since its last
commit, from every worker, in one transaction (group commit: one fsync per
batch) and only then acknowledges each message of the batch.  One intake for
all workers, not one each: SQLite takes one writer at a time, and two intakes
waiting for each other's lock doubled the time to ``250`` (23 ms instead of 10
with 50 sessions) and made two receivers slower than one.

Serve starts it (`Intake`), binds the socket the workers connect to (an
abstract Unix socket with a random name, which the intake also checks: only
processes of serve's own user get in) and keeps that socket across restarts:
if the process dies, waiting sessions get `IntakeError` (``451``), serve starts
a new one at most once per `RESTART_INTERVAL`, and a worker's next commit
connects again and waits in the socket's queue until the new one serves.

Wire format: `backupmx.link` frames.  To the intake, a `NewMessage` whose body
is in its `portable` form: the bytes of a spool still in memory, or the path of
the spool's unlinked temporary file through ``/proc/<pid>/fd/<n>``, so a 50 MiB
body is not copied through the socket.  Back, ``(queue id, None)`` or
``(queue id, (storage full?, error))``.

Failure: one message that cannot be written must not fail the others of its
batch (they come from other clients).  So a failed batch is written again, one
message per transaction on one connection: each message that still fails is
logged (``message_write_failed`` with its session and queue id) and acknowledged
with its error, and its `commit` raises `IntakeError`, so that session alone
answers ``451``; nothing of a failed message is visible.  Full storage is not
retried: every message needs space alike, and a transaction each would only hold
back the ``452``s (`commit` raises `OSError(ENOSPC)`) while the disk stays full;
nor is the rest of the batch once the connection is lost.  A message whose worker
has gone is still committed (its session never got a ``250``; the client will
send it again, as after any crash) and its acknowledgement dropped.

The process ignores SIGTERM, SIGINT and SIGHUP (systemd signals the whole
control group): it leaves when serve closes its control socket (or dies), after
the batch in hand.  It logs ``message_accepted`` for each message it commits.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
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
_CREDENTIALS = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid


class IntakeError(RuntimeError):
    """The intake process could not commit the message (or is gone)."""


# ---------------------------------------------------------------------- receiver side


class _Channel(asyncio.Protocol):
    """One end of a socket to the intake process: acknowledgements resolve commits."""

    def __init__(self, starting: bool = False) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: dict[str, asyncio.Future[None]] = {}
        # Serve's control socket: done once the process has opened the store.
        self.ready: asyncio.Future[None] | None = (
            asyncio.get_running_loop().create_future() if starting else None
        )
        self._inbox = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._inbox += data
        for ack in unframe(self._inbox):
            if ack is None:  # the process has opened the store
                if self.ready is not None:
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
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(IntakeError("the queue intake process exited at start-up"))
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(IntakeError("the queue intake process exited"))
        self.waiting.clear()


class Intake:
    """Serve's side: the intake process, its socket for the workers, its restarts."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.address = f"\0backupmx-intake-{secrets.token_hex(16)}"
        self._listener: socket.socket | None = None
        self._control: _Channel | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._closing = False
        self._restarts: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the process and wait until it has opened the store; raises IntakeError."""
        if self._listener is None:
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(self.address)
            self._listener.listen(128)
        ours, theirs = socket.socketpair()
        with theirs:
            self._process = await asyncio.create_subprocess_exec(
                *(
                    sys.executable,
                    "-m",
                    "backupmx.queue.intake",
                    str(theirs.fileno()),
                    str(self._listener.fileno()),
                    self.url,
                    logs.level(),
                ),
                pass_fds=[theirs.fileno(), self._listener.fileno()],
                stdin=subprocess.DEVNULL,
            )
        loop = asyncio.get_running_loop()
        _, self._control = await loop.create_unix_connection(lambda: _Channel(True), sock=ours)
        assert self._control.ready is not None
        try:
            await asyncio.wait_for(self._control.ready, START_TIMEOUT)
        except TimeoutError:
            self._control.transport.close()  # type: ignore[union-attr]
            raise IntakeError("the queue intake process did not start") from None
        self._restarts = loop.create_task(self._restart_when_gone(self._process))

    async def _restart_when_gone(self, process: asyncio.subprocess.Process) -> None:
        status: int | str = await process.wait()
        while not self._closing:
            log.error("intake_exited", status=status)
            await asyncio.sleep(RESTART_INTERVAL)
            if self._closing:
                return
            try:
                await self.start()
                return
            except (IntakeError, OSError) as error:
                status = str(error)

    async def close(self) -> None:
        """Let the process finish its batch and leave."""
        self._closing = True
        if self._control is not None and self._control.transport is not None:
            self._control.transport.close()
        if self._process is not None:
            process, self._process = self._process, None
            try:
                await asyncio.wait_for(process.wait(), CLOSE_TIMEOUT)
            except TimeoutError:
                log.error("intake_killed", timeout=CLOSE_TIMEOUT)
                process.kill()
                await process.wait()
        if self._restarts is not None:
            await asyncio.gather(self._restarts, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()


class IntakeClient:
    """A receiver's side: hands the intake messages over its socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel: _Channel | None = None
        self._connecting = asyncio.Lock()

    async def commit(self, message: NewMessage) -> None:
        """Return once the message is committed; raise if it was not.  Its body must be
        in its `portable` form."""
        channel = await self.connect()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        channel.waiting[message.id] = future
        channel.transport.write(frame(message))  # type: ignore[union-attr]
        await future

    async def connect(self) -> _Channel:
        """The socket to the intake, connected now if it is not (also after a restart)."""
        async with self._connecting:
            channel = self._channel
            if channel is None or channel.transport is None:
                loop = asyncio.get_running_loop()
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, self.address)  # an abstract name: no path
                    _, channel = await loop.create_unix_connection(_Channel, sock=sock)
                except OSError as error:
                    sock.close()
                    raise IntakeError(f"the queue intake is not reachable: {error}") from error
                self._channel = channel
            return channel

    async def close(self) -> None:
        if self._channel is not None and self._channel.transport is not None:
            self._channel.transport.close()


# ---------------------------------------------------------------------- intake process


def run(control: socket.socket, listener: socket.socket, url: str) -> None:
    """Commit what arrives from every worker, batch by batch, until serve closes `control`."""
    engine = open_writer_engine(url)
    inserter = Inserter(engine.dialect)
    with engine.connect():
        control.sendall(frame(None))
    inboxes: dict[socket.socket, bytearray] = {}
    pending: list[tuple[socket.socket, NewMessage]] = []
    serving = True
    while serving or pending:
        readable = _readable([control, listener, *inboxes], wait=serving and not pending)
        for sock in readable:
            if sock is control:
                serving = bool(control.recv(1 << 16))
            elif sock is listener:
                _admit(listener, inboxes)
            else:
                _receive(sock, inboxes, pending)
        if not pending:
            continue
        count, size = 0, 0
        while count < len(pending) and count < MAX_BATCH and size < MAX_BATCH_BYTES:
            size += pending[count][1].size
            count += 1
        batch, pending = pending[:count], pending[count:]
        failures = _write(engine, inserter, [m for _, m in batch], utcnow())
        _acknowledge(batch, failures, inboxes)
        for _, message in batch:  # here, off the receivers' event loops
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


def _readable(sockets: list[socket.socket], wait: bool) -> list[socket.socket]:
    readable, _, _ = select.select(sockets, [], [], None if wait else 0)
    return readable


def _admit(listener: socket.socket, inboxes: dict[socket.socket, bytearray]) -> None:
    """A worker connects; only processes of our own user are served."""
    connection, _ = listener.accept()
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
    _, uid, _ = _CREDENTIALS.unpack(credentials)
    if uid != os.getuid():
        log.error("intake_connection_refused", uid=uid)
        connection.close()
        return
    inboxes[connection] = bytearray()


def _receive(
    sock: socket.socket,
    inboxes: dict[socket.socket, bytearray],
    pending: list[tuple[socket.socket, NewMessage]],
) -> None:
    try:
        chunk = sock.recv(1 << 20)
    except OSError:
        chunk = b""
    if not chunk:  # the worker has gone: what it sent is still committed
        del inboxes[sock]
        sock.close()
        return
    inbox = inboxes[sock]
    inbox += chunk
    pending.extend((sock, message) for message in unframe(inbox))


def _acknowledge(
    batch: list[tuple[socket.socket, NewMessage]],
    failures: dict[str, Failure],
    inboxes: dict[socket.socket, bytearray],
) -> None:
    replies: dict[socket.socket, list[bytes]] = {}
    for sock, message in batch:
        replies.setdefault(sock, []).append(frame((message.id, failures.get(message.id))))
    for sock, frames in replies.items():
        if sock not in inboxes:
            continue
        try:
            sock.sendall(b"".join(frames))
        except OSError:
            del inboxes[sock]
            sock.close()


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("control", type=int, help="serve's end: the intake leaves at its close")
    parser.add_argument("listener", type=int, help="the socket the receiver workers connect to")
    parser.add_argument("url")
    parser.add_argument("log_level")
    args = parser.parse_args()
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    logs.configure(args.log_level)
    with (
        socket.socket(fileno=args.control) as control,
        socket.socket(fileno=args.listener) as listener,
    ):
        run(control, listener, args.url)


if __name__ == "__main__":
    main()
