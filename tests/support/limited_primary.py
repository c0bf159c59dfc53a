"""A primary that limits its sessions, for the pacing tests and ``bench/gentle.py``.

`LimitedPrimary` is a small SMTP server on an event loop of its own (in a thread):
it takes at most `limit` concurrent sessions, greets any beyond them with ``421 4.7.0
Too busy`` and closes, and takes `per_message` seconds per message (after the final
dot, before its ``250``).  It records every refusal, the peak of concurrent sessions
and the time of each message (`PrimaryRecord`, read with `snapshot`).  It stores
nothing.  Start-up and stop are bounded (10 s each).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field

NAME = "primary.limited.test"
BUSY = b"421 4.7.0 Too busy\r\n"


class PrimaryError(RuntimeError):
    """The primary did not start."""


@dataclass
class PrimaryRecord:
    """What the primary saw, times in `time.monotonic()`."""

    sessions: int = 0  # sessions taken (greeted with 220)
    peak: int = 0
    refusals: list[float] = field(default_factory=list)  # 421 greetings
    messages: list[float] = field(default_factory=list)  # each message's 250


class LimitedPrimary:
    """An SMTP server that takes `limit` concurrent sessions and answers ``421`` at
    connect beyond them; each message takes `per_message` seconds.  It runs on an event
    loop of its own in a thread, so that the caller's polling does not delay it.

    A session ends, for the count, when QUIT is read (before the ``221``) or the
    connection closes: a client that quits and connects again at once is not turned
    away for a session that is only being torn down."""

    def __init__(self, host: str, port: int, limit: int, per_message: float) -> None:
        self.host = host
        self.port = port
        self.limit = limit
        self.per_message = per_message
        self.record = PrimaryRecord()
        self._open = 0
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._lock = threading.Lock()

    def start(self) -> float:
        """Listen; returns the time (monotonic) it does."""
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise PrimaryError("the primary did not start")
        return time.monotonic()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None

    def snapshot(self) -> PrimaryRecord:
        with self._lock:
            r = self.record
            return PrimaryRecord(r.sessions, r.peak, list(r.refusals), list(r.messages))

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._session, self.host, self.port, limit=1 << 20)
        )
        started.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self.limit:
            with self._lock:
                self.record.refusals.append(time.monotonic())
            with contextlib.suppress(OSError):
                writer.write(BUSY)
                await writer.drain()
            writer.close()
            return
        self._open += 1
        with self._lock:
            self.record.sessions += 1
            self.record.peak = max(self.record.peak, self._open)
        counted = True
        try:
            writer.write(f"220 {NAME} ESMTP\r\n".encode())
            while True:
                line = await reader.readline()
                if not line:
                    break
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(f"250-{NAME}\r\n250-8BITMIME\r\n250 PIPELINING\r\n".encode())
                elif verb == b"DATA":
                    writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    await writer.drain()
                    while (await reader.readline()) not in (b".\r\n", b".\n", b""):
                        pass
                    await asyncio.sleep(self.per_message)
                    with self._lock:
                        self.record.messages.append(time.monotonic())
                    writer.write(b"250 2.0.0 Ok: queued\r\n")
                elif verb == b"QUIT":
                    self._open -= 1
                    counted = False
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    break
                else:  # HELO, MAIL, RCPT, RSET, NOOP
                    writer.write(b"250 2.0.0 Ok\r\n")
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            if counted:
                self._open -= 1
            writer.close()
