"""The listening sockets and the sessions on them: limits, reload, drain.

`Listener` binds every ``listen`` address (IPv4 and IPv6) on the application's
event loop, counts connections in total and per client IP (``receive.admission``
decides the ``421`` past either limit), and holds the current `ReceivePolicy`,
which `reload` swaps in one step on SIGHUP so that open sessions see the new
domains, limits and certificate from their next command.

Each `Session` gets the same `Services`: the policy and drain state to read,
the listener itself as its `Seats`, and the capabilities the application wired
(client checks, spam hook, the store's commit, ETRN).  The session never
imports the listener.

`drain` is the SIGTERM path: stop accepting, answer idle sessions
``421 4.3.2``, let sessions in DATA finish for up to ``drain_timeout``, then cut
what is left.  A message cut before its commit was never answered ``250``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable

import structlog

from backupmx.mail import replies
from backupmx.queue.store import Store
from backupmx.receive import admission
from backupmx.receive.clients import ClientChecks
from backupmx.receive.policy import ReceivePolicy
from backupmx.receive.session import Services, Session
from backupmx.receive.spamcheck import SpamChecker

log = structlog.get_logger("backupmx.receive")


class Listener:
    def __init__(
        self,
        policy: ReceivePolicy,
        store: Store,
        etrn: Callable[[str], Awaitable[int]] | None = None,
        checks: ClientChecks | None = None,
    ) -> None:
        self.policy = policy
        self.store = store
        self.checks = checks or ClientChecks(store)
        self.spam = SpamChecker()
        self.etrn = etrn  # make a domain's queued mail due now; returns how many recipients
        self.draining = False
        self.sessions: set[Session] = set()
        self._per_ip: Counter[str] = Counter()
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

    async def start(self, addresses: list[tuple[str, int]]) -> None:
        loop = asyncio.get_running_loop()
        for host, port in addresses:
            server = await loop.create_server(
                lambda: Session(self._services), host, port, reuse_address=True, backlog=512
            )
            self._servers.append(server)
            log.info("listening", host=host, port=port)

    def reload(self, policy: ReceivePolicy) -> None:
        self.policy = policy

    def admit(self, session: Session) -> str | None:
        """Count a new connection; return the refusal reply if it is over a limit."""
        reply = admission.refusal(
            self.policy.limits, self.draining, len(self.sessions), self._per_ip[session.client_ip]
        )
        if reply is not None:
            return reply
        self.sessions.add(session)
        self._per_ip[session.client_ip] += 1
        return None

    def readmit(self, session: Session, client_ip: str) -> str | None:
        """Count a proxied connection under the real client's address (PROXY header)."""
        self.forget(session)
        session.client_ip = client_ip
        return self.admit(session)

    def forget(self, session: Session) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self._per_ip[session.client_ip] -= 1
            if self._per_ip[session.client_ip] <= 0:
                del self._per_ip[session.client_ip]
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
