"""The composition root: build the store, the receiver, the deliverer and the scheduler,
and run them in one asyncio event loop.

Start-up: migrate the queue schema, give back leases this node left behind
(a crash), start the group-commit writer, bind the listeners, start the
deliverer and the scheduled jobs (probes every ``probe_interval``; expiry,
delay warnings and lease recovery every minute).

SIGHUP reloads the configuration file (domains, limits, TLS certificate,
per-domain delivery settings); a file with errors is refused and the running
configuration kept.  SIGTERM/SIGINT drain the listener (design.md §4), stop the
deliverer, give back its leases and close the store, so nothing is left
half-written.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable
from datetime import timedelta

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from backupmx import config as configuration
from backupmx.bounce.notices import Notices
from backupmx.config import parse_host_port
from backupmx.deliver.client import Timeouts
from backupmx.deliver.deliverer import Deliverer, DeliverySettings
from backupmx.deliver.pacer import Pacers
from backupmx.deliver.primaries import DomainPolicy, Primaries
from backupmx.deliver.resolver import Resolver
from backupmx.deliver.route import Identity, local_addresses
from backupmx.queue.database import upgrade
from backupmx.queue.state import Event
from backupmx.queue.store import Store, utcnow
from backupmx.receive.listener import Listener, policy_from

log = structlog.get_logger("backupmx")

HOUSEKEEPING_SECONDS = 60


def node_name(hostname: str) -> str:
    """This process's lease owner name: stable per host, so a restart reclaims its own leases."""
    return f"{socket.gethostname()}:{hostname}"


class App:
    """Holds the running configuration; everything reads its part from here on use."""

    def __init__(self, config: configuration.Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.notices = Notices(config.hostname, config.delivery.max_queue_lifetime)

    def domain_policy(self, domain: str) -> DomainPolicy:
        delivery = self.config.delivery
        for entry in self.config.domain:
            if entry.name == domain:
                return DomainPolicy(
                    static_primary=entry.primary,
                    on_primary_5xx=entry.on_primary_5xx,
                    hold_window=entry.hold_window,
                    tls=entry.tls or delivery.tls,
                )
        return DomainPolicy(tls=delivery.tls)

    def primaries(self) -> Primaries:
        config = self.config
        resolver = Resolver(
            [parse_host_port(n, default_port=53) for n in config.dns.nameservers],
            config.dns.timeout,
        )
        identity = Identity.of(
            config.hostname, config.aliases, config.listen_addresses(), local_addresses()
        )
        return Primaries(
            self.store,
            resolver,
            identity,
            self.domain_policy,
            config.delivery.port,
            config.hostname,
            self.timeouts(),
        )

    def timeouts(self) -> Timeouts:
        delivery = self.config.delivery
        return Timeouts(delivery.connect_timeout, delivery.command_timeout, delivery.data_timeout)

    def deliverer(self, primaries: Primaries) -> Deliverer:
        delivery = self.config.delivery
        settings = DeliverySettings(
            helo=self.config.hostname,
            lease=delivery.lease,
            retry_min=delivery.retry_min,
            retry_max=delivery.retry_max,
            messages_per_connection=delivery.messages_per_connection,
            timeouts=self.timeouts(),
            ca_file=delivery.ca_file,
        )
        pacers = Pacers(
            delivery.initial_connections_per_host,
            delivery.max_connections_per_host,
            delivery.max_messages_per_second_per_host,
        )
        return Deliverer(
            self.store, primaries, pacers, self.notices, settings, node_name(self.config.hostname)
        )

    async def housekeeping(self) -> None:
        """Lease recovery, expiry with DSNs, delay warnings (every minute)."""
        delivery = self.config.delivery
        now = utcnow()
        await self.store.release_expired_leases(now)
        expired = await self.store.sweep(
            Event.EXPIRE,
            self.notices.for_expired,
            older_than=now - timedelta(seconds=delivery.max_queue_lifetime),
        )
        if expired:
            log.info("recipients_expired", count=expired)
        if delivery.delay_warning > 0:
            warned = await self.store.sweep(
                None,
                self.notices.for_delayed,
                older_than=now - timedelta(seconds=delivery.delay_warning),
            )
            if warned:
                log.info("delay_warnings_queued", count=warned)


async def serve(config: configuration.Config, reload: Callable[[], configuration.Config]) -> None:
    store = Store.open(config.database)
    try:
        await upgrade(store.engine)
        owner = node_name(config.hostname)
        released = await store.release_leases(owner)
        if released:
            log.info("leases_reclaimed", recipients=released)
        store.start()
        app = App(config, store)
        primaries = app.primaries()
        deliverer = app.deliverer(primaries)
        primaries.on_up = deliverer.wake

        async def etrn(domain: str) -> int:
            due = await store.make_due(domain=domain, retry_down=True)
            deliverer.wake(domain)
            return due

        listener = Listener(policy_from(config), store, etrn)
        await listener.start([(a.host, a.port) for a in config.listen_addresses()])
        scheduler = AsyncIOScheduler()
        scheduler.add_job(
            primaries.probe_all,
            "interval",
            seconds=config.delivery.probe_interval,
            next_run_time=utcnow(),
            max_instances=1,
            coalesce=True,
        )
        scheduler.add_job(
            app.housekeeping,
            "interval",
            seconds=HOUSEKEEPING_SECONDS,
            next_run_time=utcnow(),
            max_instances=1,
            coalesce=True,
        )
        scheduler.start()
        delivering = asyncio.get_running_loop().create_task(deliverer.run(), name="deliverer")
        log.info(
            "started",
            hostname=config.hostname,
            database=_safe_url(config.database),
            domains=[d.name for d in config.domain],
        )

        def reloaded(new: configuration.Config) -> None:
            app.config = new
            listener.reload(policy_from(new))

        await _run_until_stopped(reloaded, reload)
        await listener.drain()
        scheduler.shutdown(wait=False)
        delivering.cancel()
        await asyncio.gather(delivering, return_exceptions=True)
        await store.release_leases(owner)
        log.info("stopped")
    finally:
        await store.close()


async def _run_until_stopped(
    apply: Callable[[configuration.Config], None], reload: Callable[[], configuration.Config]
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_hup() -> None:
        try:
            new = reload()
            apply(new)
        except (configuration.ConfigError, OSError, ValueError) as error:
            log.error("reload_refused", error=str(error))
            return
        log.info("reloaded", domains=[d.name for d in new.domain])

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    log.info("stopping")
    # The handlers stay for the drain that follows: a second SIGTERM, or logrotate's
    # SIGHUP, must not kill a process that is finishing sessions in DATA.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: log.info("already_stopping"))


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
