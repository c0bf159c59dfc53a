"""Frames between backupmx's own processes, and a link that asks and tells over them.

Wire format: frames of a 4-byte big-endian length and a pickle (`frame`,
`unframe`).  Only a socket pair made by the parent carries them, so the other end
is our own code: pickles are never read from anywhere else.

`Link` is one end of such a socket pair on an event loop, for the serve process
and its receiver workers (`backupmx.receive.workers`).  Either end may `ask`
(a request with a number, answered once, in any order) or `tell` (a notice, no
answer); what arrives goes to the `handler` given, whose result (awaited if it
is awaitable) is the answer.  Frames are sent together once per turn of the
event loop.  A handler that raises answers with the error's
text, and `ask` raises `LinkError` with it.  When the other end goes away,
every question waiting raises `LinkError` and `closed` is set.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import pickle
import struct
from collections.abc import Callable, Iterator
from typing import Any

import structlog

log = structlog.get_logger("backupmx")

_LENGTH = struct.Struct("!I")

Handler = Callable[..., Any]  # (verb, *args) -> answer, or an awaitable of it


class LinkError(RuntimeError):
    """The other end failed to answer (its error's text), or is gone."""


def frame(value: object) -> bytes:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def unframe(buffer: bytearray) -> Iterator[Any]:
    """Take every complete frame off the front of `buffer`."""
    start = 0
    with memoryview(buffer) as view:
        while len(buffer) - start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(view, start)
            end = start + _LENGTH.size + length
            if end > len(buffer):
                break
            yield pickle.loads(view[start + _LENGTH.size : end])
            start = end
    del buffer[:start]


class Link(asyncio.Protocol):
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.Event()
        self._inbox = bytearray()
        self._numbers = itertools.count()
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._answering: set[asyncio.Task[None]] = set()
        self._outbox: list[bytes] = []  # frames written together at the loop's next turn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, error: Exception | None) -> None:
        self.transport = None
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(LinkError("the other process is gone"))
        self._waiting.clear()
        self.closed.set()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def tell(self, verb: str, *args: Any) -> None:
        """A notice that gets no answer; dropped if the other end is gone."""
        self._send(("tell", verb, args))

    async def ask(self, verb: str, *args: Any) -> Any:
        if self.transport is None:
            raise LinkError("the other process is gone")
        number = next(self._numbers)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[number] = future
        self._send(("ask", number, verb, args))
        try:
            return await future
        finally:
            self._waiting.pop(number, None)

    def data_received(self, data: bytes) -> None:
        self._inbox += data
        for message in unframe(self._inbox):
            kind = message[0]
            if kind == "tell":
                self._handle(None, message[1], message[2])
            elif kind == "ask":
                self._handle(message[1], message[2], message[3])
            else:
                self._answered(message)

    def _answered(self, message: tuple[Any, ...]) -> None:
        kind, number, value = message
        future = self._waiting.get(number)
        if future is None or future.done():
            return
        if kind == "answer":
            future.set_result(value)
        else:
            future.set_exception(LinkError(value))

    def _handle(self, number: int | None, verb: str, args: tuple[Any, ...]) -> None:
        try:
            result = self.handler(verb, *args)
        except Exception as error:
            self._answer(number, error=error)
            return
        if inspect.isawaitable(result):
            task = asyncio.get_running_loop().create_task(self._await(number, result))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)
        else:
            self._answer(number, result)

    async def _await(self, number: int | None, pending: Any) -> None:
        try:
            result = await pending
        except Exception as error:
            self._answer(number, error=error)
        else:
            self._answer(number, result)

    def _answer(
        self, number: int | None, result: Any = None, error: Exception | None = None
    ) -> None:
        if error is not None:
            log.error("link_request_failed", error=str(error) or type(error).__name__)
        if number is None:
            return
        if error is None:
            self._send(("answer", number, result))
        else:
            self._send(("error", number, str(error) or type(error).__name__))

    def _send(self, message: tuple[Any, ...]) -> None:
        """Queue a frame; all the frames of one turn of the event loop go in one write (a
        receiver admits and releases connections by the dozen per turn)."""
        if self.transport is None:
            return
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(frame(message))

    def _flush(self) -> None:
        frames, self._outbox = self._outbox, []
        if self.transport is not None:
            self.transport.write(b"".join(frames))
