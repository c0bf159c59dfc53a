"""One receiver worker's listening sockets and the sessions on them: limits, reload, drain.

`Listener` serves the listening sockets the serve process bound and handed over
(`backupmx.receive.workers`), keeps the set of its open sessions, and holds the
current `ReceivePolicy`, which `reload` swaps in one step on SIGHUP so that open
sessions see the new domains, limits and certificate from their next command.

Admission asks the shared counts (`SharedCounts`: the serve process's
`backupmx.receive.anvil`, over the worker's link) before the greeting, so that
the connection limits, in total and per client address, hold across every worker;
``receive.admission`` decides the ``421`` past either.  A session's seat is named
by its session id and given back when it ends, also when it ends while its
admission is still being asked.

Each `Session` gets the same `Services`: the policy and drain state to read,
the listener itself as its `Seats`, and the capabilities the worker wired
(client checks, spam hook, the store's commit, ETRN).  The session never
imports the listener.

`drain` is the SIGTERM path: stop accepting, answer idle sessions
``421 4.3.2``, let sessions in DATA finish for up to ``drain_timeout``, then cut
what is left.  A message cut before its commit was never answered ``250``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from backupmx.link import LinkError
from backupmx.mail import replies
from backupmx.queue.store import Store
from backupmx.receive.clients import ClientChecks
from backupmx.receive.policy import ReceivePolicy
from backupmx.receive.session import Services, Session
from backupmx.receive.spamcheck import SpamChecker

log = structlog.get_logger("backupmx.receive")


class SharedCounts(Protocol):
    """The connection counts all workers share (`backupmx.receive.anvil`)."""

    async def admit(self, seat: str, client_ip: str) -> str | None: ...

    def leave(self, seat: str) -> None: ...


class Listener:
    def __init__(
        self,
        policy: ReceivePolicy,
        store: Store,
        counts: SharedCounts,
        checks: ClientChecks,
        etrn: Callable[[str], Awaitable[int]] | None = None,
    ) -> None:
        self.policy = policy
        self.store = store
        self.counts = counts
        self.checks = checks
        self.spam = SpamChecker()
        self.etrn = etrn  # make a domain's queued mail due now; returns how many recipients
        self.draining = False
        self.sessions: set[Session] = set()
        self._servers: list[asyncio.Server] = []
        self._all_closed = asyncio.Event()
        self._services = Services(
            policy=lambda: self.policy,
            draining=lambda: self.draining,
            seats=self,
            checks=self.checks,
            spam=self.spam,
            enqueue=store.enqueue,
            etrn=etrn,
        )

    async def start(self, sockets: list[socket.socket]) -> None:
        """Serve the listening sockets bound by the serve process."""
        loop = asyncio.get_running_loop()
        for sock in sockets:
            server = await loop.create_server(
                lambda: Session(self._services), sock=sock, backlog=512
            )
            self._servers.append(server)

    def reload(self, policy: ReceivePolicy) -> None:
        self.policy = policy

    async def admit(self, session: Session) -> str | None:
        """Take a seat for a new connection; the refusal reply if it is over a limit."""
        return await self._seat(session, session.client_ip)

    async def readmit(self, session: Session, client_ip: str) -> str | None:
        """Move the seat to the real client named by a PROXY header."""
        session.client_ip = client_ip
        return await self._seat(session, client_ip)

    async def _seat(self, session: Session, client_ip: str) -> str | None:
        if self.draining:
            self.forget(session)
            return replies.SHUTTING_DOWN
        self.sessions.add(session)
        try:
            refusal = await self.counts.admit(session.session_id, client_ip)
        except LinkError:  # the serve process is gone: this worker is about to stop
            refusal = replies.SHUTTING_DOWN
        if refusal is None and self.draining:
            refusal = replies.SHUTTING_DOWN
        if refusal is not None:
            self.forget(session)
        return refusal

    def forget(self, session: Session) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.counts.leave(session.session_id)
        if not self.sessions:
            self._all_closed.set()

    async def drain(self) -> None:
        self.draining = True
        for server in self._servers:
            server.close()
        for session in list(self.sessions):
            if not session.in_data:
                session.close_with(replies.SHUTTING_DOWN)
        if self.sessions:
            self._all_closed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), self.policy.limits.drain_timeout)
        for session in list(self.sessions):
            log.warning("session_cut", session=session.session_id)
            session.close_with(replies.SHUTTING_DOWN)
        for server in self._servers:
            await server.wait_closed()
