"""The listening sockets and the sessions on them: limits, reload, drain.

`Listener` binds every ``listen`` address (IPv4 and IPv6) on the application's
event loop, counts connections in total and per client IP (``421 4.7.0`` past
either limit, which aiosmtpd does not have), and holds the current
`ReceivePolicy`, which `reload` swaps in one step on SIGHUP so that open
sessions see the new domains, limits and certificate from their next command.

`drain` is the SIGTERM path: stop accepting, answer idle sessions
``421 4.3.2``, let sessions in DATA finish for up to ``drain_timeout``, then cut
what is left.  A message cut before its commit was never answered ``250``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

import structlog

from backupmx.config import Config, Dnsbl, Greylist, Limits, SpamCheck
from backupmx.queue.store import Store
from backupmx.receive.address import Address, RelayDomains
from backupmx.receive.clients import ClientChecks, Networks
from backupmx.receive.recipients import RecipientPolicy
from backupmx.receive.session import Session
from backupmx.receive.spamcheck import SpamChecker

log = structlog.get_logger("backupmx.receive")


@dataclass(frozen=True)
class ReceivePolicy:
    hostname: str
    relay_domains: RelayDomains
    limits: Limits
    tls_context: ssl.SSLContext | None
    etrn_clients: tuple[IPv4Network | IPv6Network, ...] = ()
    recipients: RecipientPolicy = field(default_factory=RecipientPolicy)
    spamcheck: SpamCheck = field(default_factory=SpamCheck)
    dnsbl: Dnsbl = field(default_factory=Dnsbl)
    greylist: Greylist = field(default_factory=Greylist)
    greylist_pass: Networks = ()
    proxy_from: Networks = ()  # load balancers that send a PROXY header
    postmaster: Address | None = None  # what RCPT TO:<Postmaster> stands for

    def is_postmaster(self, address: Address) -> bool:
        """postmaster@ any domain (RFC 5321 §4.5.1), or the configured postmaster mailbox."""
        configured = self.postmaster
        return address.is_postmaster or (
            configured is not None
            and address.local == configured.local
            and address.routing_domain == configured.routing_domain
        )

    def may_etrn(self, client_ip: str) -> bool:
        try:
            address = ip_address(client_ip)
        except ValueError:
            return False
        return any(address in network for network in self.etrn_clients)


def tls_context(cert: str, key: str) -> ssl.SSLContext | None:
    """Server context for STARTTLS: TLS 1.2 or newer, no client certificate asked."""
    if not cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def policy_from(config: Config) -> ReceivePolicy:
    return ReceivePolicy(
        hostname=config.hostname,
        relay_domains=RelayDomains(d.name for d in config.domain),
        limits=config.limits,
        tls_context=tls_context(config.tls.cert, config.tls.key),
        etrn_clients=tuple(ip_network(n, strict=False) for n in config.etrn_clients),
        recipients=RecipientPolicy(config.domain, config.recipients),
        spamcheck=config.spamcheck,
        dnsbl=config.dnsbl,
        greylist=config.greylist,
        greylist_pass=tuple(ip_network(n, strict=False) for n in config.greylist.pass_clients),
        proxy_from=tuple(ip_network(n, strict=False) for n in config.proxy_protocol),
        postmaster=Address(*config.postmaster_address().rsplit("@", 1)),
    )


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

    async def start(self, addresses: list[tuple[str, int]]) -> None:
        loop = asyncio.get_running_loop()
        for host, port in addresses:
            server = await loop.create_server(
                lambda: Session(self), host, port, reuse_address=True, backlog=512
            )
            self._servers.append(server)
            log.info("listening", host=host, port=port)

    def reload(self, policy: ReceivePolicy) -> None:
        self.policy = policy

    def admit(self, session: Session) -> str | None:
        """Count a new connection; return the refusal reply if it is over a limit."""
        limits = self.policy.limits
        if self.draining:
            return "421 4.3.2 Service shutting down, try again later"
        if len(self.sessions) >= limits.max_connections:
            return "421 4.7.0 Error: too many connections, try again later"
        if self._per_ip[session.client_ip] >= limits.max_connections_per_ip:
            return "421 4.7.0 Error: too many connections from your address"
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
                session.close_with("421 4.3.2 Service shutting down, try again later")
        if self.sessions:
            self._all_closed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), self.policy.limits.drain_timeout)
        for session in list(self.sessions):
            log.warning("session_cut", session=session.session_id)
            session.close_with("421 4.3.2 Service shutting down, try again later")
        for server in self._servers:
            await server.wait_closed()
