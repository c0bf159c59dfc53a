"""A primary MX for the cluster tests that counts what it is given.

`CountingPrimary` is a small SMTP server (asyncio, in a thread of its own) on a
loopback port.  It keeps, for the tests of docs/queue.md's "at most once per
recipient" and the cluster's pacing:

* every message it accepted, by its ``Message-ID`` header (`counts`, `total`,
  `duplicates`: the Message-IDs it accepted more than once);
* every SMTP connection (open session, from connect to close, not only DATA):
  its peer, which backupmx node opened it (when told the nodes' pids with
  `name_nodes`), when it opened and closed, and the most sessions that were
  open at once (`max_concurrent`); and the most *delivering* sessions open at
  once (`max_delivering`, also per node): those that have sent a MAIL command,
  counted from it until they close, idle time between messages included.  A
  probe (connect, EHLO, QUIT) is a session but not a delivering one;
* an optional `delay` between the end of DATA and the ``250``: a slow primary,
  such as one just back from an outage.

A message counts as accepted when the primary decides to answer ``250`` to its
end of data, whether or not the client is still there to read it: a real MTA
commits the message first and then replies, which is the duplicate window of
RFC 5321 §6.1 (the receiver has the message, the sender never learns it).

It can be created down (`CountingPrimary(...)`, nothing listens on the port)
and brought up later (`start`), taken down again (`stop`, which also cuts the
open sessions) and closed (`close`).  Every wait is bounded: start-up and stop
by `START_SECONDS`, an idle session by `IDLE_SECONDS`, a DATA phase by
`DATA_SECONDS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Self

from tests.support.ports import free_port

START_SECONDS = 10.0
IDLE_SECONDS = 120.0  # a session with no command for this long is closed
DATA_SECONDS = 300.0  # a whole DATA phase
MAX_MESSAGE = 64 * 1024 * 1024
LINE_LIMIT = 16 * 1024 * 1024  # the StreamReader's buffer, and the longest stretch without ".\r\n"


@dataclass(frozen=True)
class Delivery:
    """One message the primary accepted."""

    message_id: str | None  # the Message-ID header's value, "<…@…>", None without one
    sender: str
    recipients: tuple[str, ...]
    connection: int  # `Connection.number`
    node: str | None  # the backupmx node that sent it, if `name_nodes` named it
    data_at: float  # time.time() when the end of data arrived
    accepted_at: float  # time.time() when the 250 was decided (after `delay`)
    size: int


@dataclass
class Connection:
    """One SMTP session, from accept to close."""

    number: int
    peer: tuple[str, int]
    node: str | None
    opened_at: float  # time.time()
    closed_at: float | None = None
    messages: int = 0
    delivering: bool = False  # it has sent MAIL


@dataclass
class _Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    deliveries: list[Delivery] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    connections: list[Connection] = field(default_factory=list)
    open: int = 0
    max_open: int = 0
    open_by_node: Counter[str] = field(default_factory=Counter)
    max_by_node: Counter[str] = field(default_factory=Counter)
    delivering: int = 0
    max_delivering: int = 0
    delivering_by_node: Counter[str] = field(default_factory=Counter)
    max_delivering_by_node: Counter[str] = field(default_factory=Counter)
    numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


class CountingPrimary:
    """An SMTP server on ``host:port`` that counts deliveries per Message-ID and
    concurrent sessions; created down, `start` brings it up."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        delay: float = 0.0,
        name: str = "primary.test",
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.delay = delay  # seconds between the end of DATA and the 250; may be changed
        self.name = name
        self._tally = _Tally()
        self._nodes: dict[int, str] = {}  # pid -> node name, for `Connection.node`
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"primary-{self.port}", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ control

    @property
    def address(self) -> str:
        """``host:port``, as a static route names it."""
        return f"{self.host}:{self.port}"

    @property
    def up(self) -> bool:
        return self._server is not None

    def start(self) -> Self:
        """Listen on the port (bring the primary up)."""
        self._call(self._listen())
        return self

    def stop(self) -> None:
        """Close the port and cut every open session (the primary goes down)."""
        if self._thread.is_alive():
            self._call(self._shut())

    def close(self) -> None:
        """Stop and end the thread; the counts stay readable."""
        self.stop()
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(START_SECONDS)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def name_nodes(self, pids: dict[int, str]) -> None:
        """Name the backupmx processes (pid -> node name): connections they open from
        now on carry that name in `Connection.node` and `Delivery.node`."""
        self._nodes = dict(pids)

    def reset(self) -> None:
        """Forget what was counted so far (sessions still open stay counted as open)."""
        with self._tally.lock:
            self._tally.deliveries.clear()
            self._tally.counts.clear()
            self._tally.connections = [c for c in self._tally.connections if c.closed_at is None]
            self._tally.max_open = self._tally.open
            self._tally.max_by_node = Counter(self._tally.open_by_node)
            self._tally.max_delivering = self._tally.delivering
            self._tally.max_delivering_by_node = Counter(self._tally.delivering_by_node)

    # ------------------------------------------------------------------ figures

    @property
    def total(self) -> int:
        """Messages accepted, copies included."""
        with self._tally.lock:
            return len(self._tally.deliveries)

    def counts(self) -> dict[str, int]:
        """Message-ID -> how many times it was accepted."""
        with self._tally.lock:
            return dict(self._tally.counts)

    def unique(self) -> int:
        """Distinct Message-IDs accepted."""
        with self._tally.lock:
            return len(self._tally.counts)

    def duplicates(self) -> dict[str, int]:
        """Message-IDs accepted more than once, with their counts."""
        with self._tally.lock:
            return {mid: n for mid, n in self._tally.counts.items() if n > 1}

    def deliveries(self, message_id: str | None = None) -> list[Delivery]:
        """Every accepted message in order (only those of `message_id` if given)."""
        with self._tally.lock:
            found = list(self._tally.deliveries)
        return found if message_id is None else [d for d in found if d.message_id == message_id]

    def connections(self) -> list[Connection]:
        with self._tally.lock:
            return list(self._tally.connections)

    def connection(self, number: int) -> Connection:
        with self._tally.lock:
            return next(c for c in self._tally.connections if c.number == number)

    @property
    def open_connections(self) -> int:
        with self._tally.lock:
            return self._tally.open

    @property
    def max_concurrent(self) -> int:
        """The most sessions that were open at once."""
        with self._tally.lock:
            return self._tally.max_open

    def max_concurrent_by_node(self) -> dict[str, int]:
        with self._tally.lock:
            return dict(self._tally.max_by_node)

    @property
    def max_delivering(self) -> int:
        """The most delivering sessions (MAIL sent, not yet closed) open at once."""
        with self._tally.lock:
            return self._tally.max_delivering

    def max_delivering_by_node(self) -> dict[str, int]:
        with self._tally.lock:
            return dict(self._tally.max_delivering_by_node)

    def delivered_by_node(self) -> dict[str | None, int]:
        with self._tally.lock:
            return dict(Counter(d.node for d in self._tally.deliveries))

    def summary(self) -> str:
        """One line for a test's output."""
        return (
            f"primary {self.address}: {self.total} accepted, {self.unique()} distinct, "
            f"{len(self.duplicates())} duplicated; at most {self.max_delivering} delivering "
            f"sessions at once {self.max_delivering_by_node() or ''}, "
            f"{self.max_concurrent} sessions with probes"
        )

    # ------------------------------------------------------------------ the loop

    def _call(self, coroutine: Coroutine[Any, Any, None]) -> None:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        future.result(START_SECONDS)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._session, self.host, self.port, limit=LINE_LIMIT, backlog=512
            )

    async def _shut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), START_SECONDS)

    def _opened(self, writer: asyncio.StreamWriter) -> Connection:
        peer = writer.get_extra_info("peername") or ("?", 0)
        node = self._node_of(int(peer[1])) if self._nodes else None
        tally = self._tally
        with tally.lock:
            number = next(tally.numbers)
            connection = Connection(number, (peer[0], peer[1]), node, time.time())
            tally.connections.append(connection)
            tally.open += 1
            tally.max_open = max(tally.max_open, tally.open)
            if node is not None:
                tally.open_by_node[node] += 1
                tally.max_by_node[node] = max(tally.max_by_node[node], tally.open_by_node[node])
        return connection

    def _closed(self, connection: Connection) -> None:
        tally = self._tally
        with tally.lock:
            connection.closed_at = time.time()
            tally.open -= 1
            if connection.node is not None:
                tally.open_by_node[connection.node] -= 1
            if connection.delivering:
                tally.delivering -= 1
                if connection.node is not None:
                    tally.delivering_by_node[connection.node] -= 1

    def _delivering(self, connection: Connection) -> None:
        tally = self._tally
        with tally.lock:
            if connection.delivering:
                return
            connection.delivering = True
            tally.delivering += 1
            tally.max_delivering = max(tally.max_delivering, tally.delivering)
            node = connection.node
            if node is not None:
                tally.delivering_by_node[node] += 1
                tally.max_delivering_by_node[node] = max(
                    tally.max_delivering_by_node[node], tally.delivering_by_node[node]
                )

    def _node_of(self, peer_port: int) -> str | None:
        """Which named process owns the client end of the connection from `peer_port`:
        its socket inode from /proc/net/tcp*, then the named pids' descriptors."""
        inode = socket_inode(peer_port, self.port)
        if inode is None:
            return None
        link = f"socket:[{inode}]"
        for pid, name in self._nodes.items():
            try:
                descriptors = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in descriptors:
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                        return name
        return None

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = self._opened(writer)
        self._writers.add(writer)
        try:
            await self._converse(reader, writer, connection)
        except (OSError, EOFError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            self._closed(connection)
            writer.transport.abort()

    async def _converse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: Connection
    ) -> None:
        def reply(text: str) -> None:
            writer.write(text.encode() + b"\r\n")

        reply(f"220 {self.name} ESMTP counting primary")
        sender: str | None = None
        recipients: list[str] = []
        while True:
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), IDLE_SECONDS)
            if not line:
                return
            command = line.decode("utf-8", "replace").rstrip("\r\n")
            verb = command[:4].upper()
            if verb == "EHLO":
                reply(f"250-{self.name}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8")
                reply("250-ENHANCEDSTATUSCODES\r\n250 SIZE 0")
            elif verb == "HELO":
                reply(f"250 {self.name}")
            elif verb == "MAIL":
                self._delivering(connection)
                sender, recipients = address(command), []
                reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                if sender is None:
                    reply("503 5.5.1 MAIL first")
                else:
                    recipients.append(address(command))
                    reply("250 2.1.5 Ok")
            elif verb == "DATA":
                if sender is None or not recipients:
                    reply("503 5.5.1 RCPT first")
                    continue
                reply("354 End data with <CR><LF>.<CR><LF>")
                await writer.drain()
                content = await asyncio.wait_for(read_data(reader), DATA_SECONDS)
                data_at = time.time()
                if self.delay > 0:
                    await asyncio.sleep(self.delay)
                self._accepted(connection, sender, recipients, content, data_at)
                reply(f"250 2.0.0 Ok: queued as {connection.number}.{connection.messages}")
                sender, recipients = None, []
            elif verb == "RSET":
                sender, recipients = None, []
                reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                reply("221 2.0.0 Bye")
                await writer.drain()
                return
            else:
                reply("502 5.5.2 Command not recognized")

    def _accepted(
        self,
        connection: Connection,
        sender: str,
        recipients: list[str],
        content: bytes,
        data_at: float,
    ) -> None:
        message_id = header(content, b"message-id")
        delivery = Delivery(
            message_id,
            sender,
            tuple(recipients),
            connection.number,
            connection.node,
            data_at,
            time.time(),
            len(content),
        )
        with self._tally.lock:
            connection.messages += 1
            self._tally.deliveries.append(delivery)
            if message_id is not None:
                self._tally.counts[message_id] += 1


def address(command: str) -> str:
    """The address inside <…> of a MAIL or RCPT command ("" for <>)."""
    start, end = command.find("<"), command.find(">")
    return command[start + 1 : end] if 0 <= start < end else ""


async def read_data(reader: asyncio.StreamReader) -> bytes:
    """The message up to the line ".", dot-stuffing undone, CRLF line ends kept.

    Reads up to each ".\\r\\n" (fast: a few calls per message, not one per line) and
    stops at the first that begins a line."""
    content = b""
    while True:
        try:
            content += await reader.readuntil(b".\r\n")
        except asyncio.IncompleteReadError as error:
            raise EOFError("the client closed the connection in DATA") from error
        except asyncio.LimitOverrunError:
            raise ValueError("a line of the message is too long") from None
        if content == b".\r\n" or content.endswith(b"\r\n.\r\n"):
            break
        if len(content) > MAX_MESSAGE:
            raise ValueError("message too big")
    content = content[:-3]
    if content.startswith(b"."):
        content = content[1:]
    return content.replace(b"\r\n.", b"\r\n")


def header(content: bytes, name: bytes) -> str | None:
    """The first `name` header's value (unfolded, stripped), or None."""
    head = content.split(b"\r\n\r\n", 1)[0].replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ")
    prefix = name.lower() + b":"
    for line in head.split(b"\r\n"):
        if line.lower().startswith(prefix):
            return line[len(prefix) :].strip().decode("utf-8", "replace")
    return None


def socket_inode(local_port: int, remote_port: int) -> int | None:
    """The inode of the TCP socket from loopback `local_port` to `remote_port`, from
    /proc/net/tcp and tcp6 (the client end of a connection the primary accepted)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows, None)
                for row in rows:
                    fields = row.split()
                    if (
                        len(fields) > 9
                        and int(fields[1].rsplit(":", 1)[1], 16) == local_port
                        and int(fields[2].rsplit(":", 1)[1], 16) == remote_port
                    ):
                        return int(fields[9])
        except OSError:
            continue
    return None
