"""The control socket: how ``backupmx status`` asks the running ``serve`` whether it is alive.

A local Unix stream socket (``control_socket``; by default next to the SQLite queue,
``queue.db`` → ``queue.sock``, or ``/run/backupmx/control.sock`` for PostgreSQL),
independent of the metrics port, which may be off or taken.  The protocol is the
simplest that works: a client connects, the server writes one JSON document
(`Channel.report`, docs/contracts.md#json-output) and closes.  Nothing is read from the
client, so nothing it sends can change the server.

Promises: ``serve`` claims the socket before it opens the database, so two
servers never run on one socket (a second one refuses to start, naming the
socket); a socket file left by a crashed server is replaced; the file is mode
0660 (the service's user and group may ask) and is removed at a clean stop.  An
answer takes at most ``STORE_TIMEOUT`` on the server's side (its look at the
database) and `ask` waits at most ``ASK_TIMEOUT``: a server that says nothing in
that time is "not answering".
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from backupmx.config import Config
from backupmx.preflight import Problem, StartupFailure

RUNTIME_SOCKET = Path("/run/backupmx/control.sock")  # the unit's RuntimeDirectory=backupmx
ASK_TIMEOUT = 3.0  # seconds `status` waits for the whole answer
STORE_TIMEOUT = 1.0  # seconds the server spends on its database check: well inside ASK_TIMEOUT
MAX_ANSWER = 64 * 1024  # bytes; an answer is a few hundred
MAX_PATH = 107  # bytes in a Unix socket's address (sun_path), without its NUL
MODE = 0o660


def socket_path(config: Config) -> Path:
    """``control_socket``, else beside the SQLite queue file (one socket per queue, so
    servers in different directories never meet), else `RUNTIME_SOCKET`."""
    if config.control_socket:
        return Path(config.control_socket)
    url = make_url(config.database)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return Path(url.database).with_suffix(".sock")
    return RUNTIME_SOCKET


class NoAnswer(Exception):
    """Nothing answered on the control socket; the message says what happened instead."""

    def __init__(self, reason: str, running: bool | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.running = running  # False: no server; None: cannot tell (a permission, a hang)


async def ask(path: Path, wait: float = ASK_TIMEOUT) -> dict[str, Any]:
    """The running server's `Channel.report`, or `NoAnswer` after at most `wait` seconds."""
    try:
        async with asyncio.timeout(wait):
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                body = await reader.read(MAX_ANSWER)
            finally:
                writer.close()
    except TimeoutError:
        raise NoAnswer(f"no answer within {wait:g}s", None) from None
    except OSError as error:
        gone = error.errno in (errno.ENOENT, errno.ECONNREFUSED)
        reason = error.strerror or str(error)
        if error.errno == errno.EACCES:
            reason += ": ask as the service's user or group, or as root"
        raise NoAnswer(reason, False if gone else None) from None
    try:
        report = json.loads(body)
    except ValueError:
        raise NoAnswer("the answer is not JSON", None) from None
    if not isinstance(report, dict):
        raise NoAnswer("the answer is not a JSON object", None)
    return report


@dataclass(frozen=True)
class Running:
    """What a server that has started reports, handed over by the composition root."""

    accepting: Callable[[], bool]  # the SMTP listener is bound and not draining
    fence_up: Callable[[], bool]  # this node's heartbeat is recent enough to send
    store_problem: Callable[[], Awaitable[str | None]]  # None: the database answers


class Channel:
    """The server's side: claim the socket, answer each connection with its `report`."""

    def __init__(self, path: Path, config: Config, node: str, version: str) -> None:
        self.path = path
        self.running: Running | None = None  # set once the listener accepts mail
        self.config = config  # the running configuration: a reload replaces it
        self._static = {"version": version, "pid": os.getpid(), "node": node}
        self._started = time.time()
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._answering: set[asyncio.Task[Any]] = set()

    async def open(self) -> None:
        """Claim the socket, replacing a crashed server's file; `StartupFailure` (one line
        naming ``control_socket``) if another server answers on it or it cannot be made."""
        problem = await self._claimable()
        if problem:
            raise StartupFailure([Problem("control_socket", f"{self.path}: {problem}", True)])
        try:
            self._server = await asyncio.start_unix_server(self._answer, self.path)
            os.chmod(self.path, MODE)
            self._inode = os.stat(self.path).st_ino
        except OSError as error:
            await self.close()
            text = f"{self.path}: cannot listen on it: {error.strerror or error}"
            raise StartupFailure([Problem("control_socket", text, True)]) from error

    async def _claimable(self) -> str | None:
        if len(os.fsencode(self.path)) > MAX_PATH:
            return f"longer than the {MAX_PATH} bytes a Unix socket's path may have"
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            return None
        if not stat.S_ISSOCK(found.st_mode):
            return "exists and is not a socket"
        try:
            async with asyncio.timeout(ASK_TIMEOUT):
                _, writer = await asyncio.open_unix_connection(self.path)
        except ConnectionRefusedError:
            os.unlink(self.path)  # a crashed server's: nothing listens on it
            return None
        except TimeoutError:
            return "cannot tell whether another server listens on it (connect timed out)"
        except OSError as error:
            return f"cannot tell whether another server listens on it ({error.strerror})"
        writer.close()
        return "another backupmx serve is running (it answers on this control socket)"

    async def close(self) -> None:
        """Stop answering and remove the socket file, if it is still the one we made."""
        if self._server is None:
            return
        self._server.close()
        if self._answering:  # each ends within its own bounds; none may outlive the store
            _, late = await asyncio.wait(self._answering, timeout=STORE_TIMEOUT + ASK_TIMEOUT)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    async def report(self) -> dict[str, Any]:
        """What `ask` gets: who this server is and whether it can take and send mail."""
        config = self.config
        facts: dict[str, Any] = {
            **self._static,
            "hostname": config.hostname,
            "listen": list(config.listen),
            "metrics": config.metrics.listen or None,
            # What it backs up, quick-start flags included: `status` without the
            # server's command line still knows.
            "domains": [d.name for d in config.domain],
            "started_at": _iso(self._started),
            "uptime_seconds": round(time.time() - self._started),
        }
        running = self.running
        if running is None:
            return facts | {
                "state": "starting",
                "accepting": False,
                "fence_up": None,
                "store": None,
            }
        try:
            async with asyncio.timeout(STORE_TIMEOUT):
                problem = await running.store_problem()
        except TimeoutError:
            problem = f"no answer within {STORE_TIMEOUT:g}s"
        accepting = running.accepting()
        return {
            **facts,
            "state": "running" if accepting else "stopping",
            "accepting": accepting,
            "fence_up": running.fence_up(),
            "store": {"reachable": problem is None, "error": problem},
        }

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)
        try:
            writer.write((json.dumps(await self.report()) + "\n").encode())
            async with asyncio.timeout(ASK_TIMEOUT):
                await writer.drain()
        except (ConnectionError, TimeoutError):
            pass  # the client went away, or reads nothing
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
