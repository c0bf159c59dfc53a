"""A receiver worker: a process of its own that takes SMTP connections for serve.

The serve process binds the listening sockets and starts ``receivers`` of these
(`backupmx.receive.workers`); each inherits the sockets and accepts from them on
its own event loop, so receiving uses every core.  What must be one for all of
them stays in the serve process and is asked over the worker's link
(`backupmx.link`): the per-client counts (`backupmx.receive.anvil`: admission
and rates), recipient callouts (one verification cache and one callout budget),
and ETRN's wake-up of the deliverer.  Everything else is the worker's own: its
store connections (greylisting, the spam records), and its socket to serve's
intake process, which commits what its sessions receive (invariant 1: ``250``
only after the commit).

The link carries, from serve: ``start`` (the configuration and the intake's
address; answered once the sockets are served), ``reload`` (a new configuration, on
SIGHUP) and ``counts`` (this process's receiving metrics, for a scrape).

SIGTERM or SIGINT drains (`Listener.drain`), lets the intake commit what it
holds, and exits 0.  SIGHUP is ignored: serve reads the file and sends the
configuration it accepted, so every worker runs the same one.  If serve goes
away (the link closes) the worker drains and exits as on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
from typing import Any

import structlog
import uvloop

from backupmx import logs, metrics
from backupmx.config import Config, Recipients
from backupmx.link import Link, LinkError
from backupmx.mail.address import Address
from backupmx.mail.hosts import parse_host_port
from backupmx.queue.store import Store
from backupmx.receive.clients import ClientChecks
from backupmx.receive.listener import Listener
from backupmx.receive.policy import policy_from
from backupmx.receive.recipients import Status, Verification
from backupmx.resolver import Resolver

log = structlog.get_logger("backupmx.receive")


class Serve:
    """What this worker asks the serve process: the shared counts, callouts, ETRN."""

    def __init__(self, link: Link) -> None:
        self.link = link

    async def admit(self, seat: str, client_ip: str) -> str | None:
        refusal: str | None = await self.link.ask("admit", seat, client_ip)
        return refusal

    def leave(self, seat: str) -> None:
        self.link.tell("leave", seat)

    async def take(self, kind: str, client_ip: str, limit: int) -> bool:
        allowed: bool = await self.link.ask("take", kind, client_ip, limit)
        return allowed

    async def check(self, address: Address, settings: Recipients) -> Verification:
        try:
            found: Verification = await self.link.ask("verify", address, settings)
        except LinkError as error:
            return Verification(Status.UNVERIFIED, f"no answer from the serve process: {error}")
        return found

    async def etrn(self, domain: str) -> int:
        due: int = await self.link.ask("etrn", domain)
        return due


class Worker:
    def __init__(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets
        self.stop = asyncio.Event()
        self.listener: Listener | None = None
        self.store: Store | None = None
        self.serve: Serve | None = None
        self.config: Config | None = None  # the latest serve sent, a reload during start too

    def handle(self, verb: str, *args: Any) -> Any:
        if verb == "start":
            return self.start(*args)
        if verb == "reload":
            return self.reload(*args)
        if verb == "counts":
            return metrics.received_samples()
        raise ValueError(f"unknown request {verb!r}")

    async def start(self, config: Config, intake_address: str) -> None:
        serve = self.serve
        assert serve is not None
        # A reload sent in the same write as "start" is handled first (it is not a
        # coroutine): its configuration is the newer one.
        self.config = self.config or config
        self.store = Store.open(config.database)
        await self.store.receive_through(intake_address)
        resolver = Resolver(
            [parse_host_port(n, default_port=53) for n in config.dns.nameservers],
            config.dns.timeout,
        )
        checks = ClientChecks(self.store, serve, serve, resolver.addresses)
        self.listener = Listener(policy_from(self.config), self.store, serve, checks, serve.etrn)
        metrics.follow(self.listener.policy.relay_domains)
        await self.listener.start(self.sockets)

    def reload(self, config: Config) -> None:
        """A new configuration; one that comes while the worker starts is the one it
        starts with."""
        self.config = config
        if self.listener is not None:
            self.listener.reload(policy_from(config))
            metrics.follow(self.listener.policy.relay_domains)

    async def run(self, link_fd: int) -> None:
        loop = asyncio.get_running_loop()
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, self.stop.set)
        _, link = await loop.create_unix_connection(
            lambda: Link(self.handle), sock=socket.socket(fileno=link_fd)
        )
        self.serve = Serve(link)
        gone = loop.create_task(link.closed.wait())
        stopping = loop.create_task(self.stop.wait())
        await asyncio.wait([gone, stopping], return_when=asyncio.FIRST_COMPLETED)
        for number in (signal.SIGTERM, signal.SIGINT):  # a second signal must not kill the drain
            loop.add_signal_handler(number, lambda: None)
        if self.listener is not None:
            await self.listener.drain()
        if self.store is not None:
            await self.store.close()
        link.close()
        gone.cancel()
        stopping.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("link", type=int, help="this end of the socket pair to serve")
    parser.add_argument("log_level")
    parser.add_argument("sockets", type=int, nargs="+", help="the listening sockets")
    args = parser.parse_args()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logs.configure(args.log_level)
    for fd in (args.link, *args.sockets):
        # Inherited, so inheritable: the intake process this worker starts must not hold
        # the listening sockets (a drained worker's intake would still take connections).
        os.set_inheritable(fd, False)
    sockets = [socket.socket(fileno=fd) for fd in args.sockets]
    uvloop.run(Worker(sockets).run(args.link))


if __name__ == "__main__":
    main()
