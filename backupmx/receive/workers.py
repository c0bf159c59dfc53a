"""The receiver workers, from the serve process: bind, start, answer, replace, drain.

Theory of operation.  One event loop receives about one core's worth of mail,
so serve receives in ``receivers`` worker processes (default one per core,
`backupmx.receive.worker`), as Postfix's master runs smtpd processes on the
sockets it bound: `Receivers.bind` binds every ``listen`` address here, and each
worker inherits the listening sockets and accepts from the same queue, so a
busy worker leaves the next connection to an idle one.  Serve keeps the rest of
the server (the deliverer, the scheduled jobs, metrics, the control socket).

What must be one for all workers stays here and is answered over each worker's
link (`backupmx.link`): ``admit``/``leave`` and ``take`` go to the `Anvil`
(connection counts and rates, so the limits are exact), ``verify`` to the one
`Verifier` (its cache and callout budget), ``etrn`` to the deliverer's wake-up.

Start-up: serve waits until every worker answers ``start`` (its sockets
served) before READY=1.  A worker that exits while serve is not
stopping is logged (``receiver_exited``), its seats are given back, and a new
one starts, at most one per `RESTART_INTERVAL`; the sessions it had are cut, and
none of them had been answered ``250`` for a message not committed (the
intake commits before the reply).  SIGHUP: serve reads the file and
sends the configuration it accepted to every worker, and logs ``reloaded`` once
each has applied it.  Drain (SIGTERM): serve
closes its copies of the sockets and signals every worker, which drains its
sessions (``drain_timeout``) and exits; a worker still there
`DRAIN_GRACE` seconds later is killed.  The scrape asks each worker for its
receiving counts (`metrics.ReceivedCounts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from backupmx import logs, metrics
from backupmx.config import Config
from backupmx.link import Link, LinkError
from backupmx.mail.hosts import HostPort, listening_socket
from backupmx.receive.anvil import Anvil
from backupmx.receive.recipients import Verifying

log = structlog.get_logger("backupmx.receive")

RESTART_INTERVAL = 1.0  # seconds between starts of a worker, when one keeps failing
START_TIMEOUT = 60.0  # seconds a worker may take to serve
COUNTS_TIMEOUT = 1.0  # seconds a scrape waits for a worker's counts
RELOAD_TIMEOUT = 10.0  # seconds a worker may take to apply a new configuration
DRAIN_GRACE = 10.0  # seconds past drain_timeout before a worker that has not exited is killed


class ReceiverFailed(RuntimeError):
    """A worker did not start."""


@dataclass
class _Worker:
    number: int
    process: asyncio.subprocess.Process
    link: Link


class Receivers:
    def __init__(
        self,
        config: Config,
        anvil: Anvil,
        verifier: Verifying,
        etrn: Callable[[str], Awaitable[int]],
        intake_address: str,
    ) -> None:
        self.config = config  # the running one: a new worker starts with it
        self.intake_address = intake_address  # serve's intake, which commits what they receive
        self.anvil = anvil
        self.verifier = verifier
        self.etrn = etrn
        self.counts = metrics.ReceivedCounts()
        self.draining = False
        self._sockets: list[socket.socket] = []
        self._workers: dict[int, _Worker] = {}
        self._watching: set[asyncio.Task[None]] = set()
        self._last_start = -RESTART_INTERVAL

    # ------------------------------------------------------------------ start

    def bind(self, addresses: list[HostPort]) -> None:
        """Bind every address (each of a name's addresses); raises OSError.  The first
        worker to serve a socket makes it listen: no connection waits for nobody."""
        for address in addresses:
            for family, _, _, _, sockaddr in socket.getaddrinfo(
                address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            ):
                sock = listening_socket(family, sockaddr)
                self._sockets.append(sock)
            log.info("listening", host=address.host, port=address.port)

    async def start(self, count: int) -> None:
        """Start `count` workers and wait until each serves; raises ReceiverFailed."""
        self.counts.install()
        started = await asyncio.gather(
            *(self._start(number) for number in range(count)), return_exceptions=True
        )
        failed = [str(error) for error in started if isinstance(error, BaseException)]
        if failed:
            raise ReceiverFailed(failed[0])
        log.info("receivers_started", receivers=count)

    async def _start(self, number: int) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "backupmx.receive.worker",
                str(theirs.fileno()),
                logs.level(),
                *(str(sock.fileno()) for sock in self._sockets),
                pass_fds=[theirs.fileno(), *(sock.fileno() for sock in self._sockets)],
                stdin=subprocess.DEVNULL,
            )
        loop = asyncio.get_running_loop()
        _, link = await loop.create_unix_connection(
            lambda: Link(lambda verb, *args: self._handle(number, verb, *args)), sock=ours
        )
        worker = _Worker(number, process, link)
        self._workers[number] = worker
        watch = loop.create_task(self._watch(worker), name=f"receiver {number}")
        self._watching.add(watch)
        watch.add_done_callback(self._watching.discard)
        try:
            await asyncio.wait_for(
                link.ask("start", self.config, self.intake_address), START_TIMEOUT
            )
        except (LinkError, TimeoutError) as error:
            process.kill()
            raise ReceiverFailed(f"receiver {number} did not start: {error}") from error

    # ------------------------------------------------------------------ questions

    def _handle(self, number: int, verb: str, *args: Any) -> Any:
        if verb == "admit":
            return self.anvil.admit(number, *args)
        if verb == "leave":
            return self.anvil.leave(number, *args)
        if verb == "take":
            return self.anvil.take(*args)
        if verb == "verify":
            return self.verifier.check(*args)
        if verb == "etrn":
            return self.etrn(*args)
        raise ValueError(f"unknown request {verb!r}")

    # ------------------------------------------------------------------ running

    @property
    def accepting(self) -> bool:
        """Bound, not draining, and at least one worker serving."""
        return not self.draining and bool(self._workers)

    async def reload(self, config: Config) -> None:
        """Send `config` to every worker; return once each has applied it (or failed to
        answer within `RELOAD_TIMEOUT`), so that "reloaded" is true when it is logged."""
        self.config = config

        async def send(worker: _Worker) -> None:
            try:
                await asyncio.wait_for(worker.link.ask("reload", config), RELOAD_TIMEOUT)
            except (LinkError, TimeoutError) as error:
                log.error("receiver_reload_failed", receiver=worker.number, error=str(error))

        await asyncio.gather(*(send(w) for w in list(self._workers.values())))

    async def gather(self) -> None:
        """Ask every worker for its receiving counts (before a scrape)."""

        async def ask(worker: _Worker) -> None:
            with contextlib.suppress(LinkError, TimeoutError):
                samples = await asyncio.wait_for(worker.link.ask("counts"), COUNTS_TIMEOUT)
                if worker.number in self._workers:
                    self.counts.live[worker.number] = samples

        await asyncio.gather(*(ask(w) for w in list(self._workers.values())))

    async def _watch(self, worker: _Worker) -> None:
        status = await worker.process.wait()
        worker.link.close()
        self._workers.pop(worker.number, None)
        self.counts.retire(worker.number)
        seats = self.anvil.receiver_gone(worker.number)
        if self.draining:
            return
        log.error("receiver_exited", receiver=worker.number, status=status, sessions_cut=seats)
        wait = self._last_start + RESTART_INTERVAL - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._last_start = time.monotonic()
        try:
            await self._start(worker.number)
        except ReceiverFailed as error:
            log.error("receiver_restart_failed", receiver=worker.number, error=str(error))
            return
        log.info(
            "receiver_replaced",
            receiver=worker.number,
            pid=self._workers[worker.number].process.pid,
        )

    # ------------------------------------------------------------------ drain

    async def drain(self) -> None:
        """Stop accepting; let every worker finish its sessions and exit."""
        self.draining = True
        self.anvil.draining = True
        for sock in self._sockets:
            sock.close()
        workers = list(self._workers.values())
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        grace = self.config.limits.drain_timeout + DRAIN_GRACE
        processes = [worker.process.wait() for worker in workers]
        try:
            await asyncio.wait_for(asyncio.gather(*processes), grace)
        except TimeoutError:
            for worker in workers:
                if worker.process.returncode is None:
                    log.error("receiver_killed", receiver=worker.number, timeout=grace)
                    worker.process.kill()
        await asyncio.gather(*self._watching, return_exceptions=True)
        self.counts.uninstall()
