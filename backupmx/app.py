"""The composition root: build the store, the receiver, the deliverer and the scheduler,
and run them in one asyncio event loop.

Start-up: migrate the queue schema, join the nodes sharing the queue (give back
the leases this node's name left behind after a crash, register, first
heartbeat: `backupmx.deliver.membership`), start the group-commit writer, bind
the listeners, start the heartbeat, the deliverer and the scheduled jobs (probes
every ``probe_interval``; expiry, delay warnings and the retention of finished
messages every ``housekeeping_interval``).

SIGHUP reloads the configuration file (domains, limits, TLS certificate,
per-domain delivery settings); a file with errors is refused and the running
configuration kept.  SIGTERM/SIGINT drain the listener, stop the deliverer and
the heartbeat, give back this node's leases, mark it stopped and close the store,
so nothing is left half-written (docs/contracts.md#signals-and-systemd).

Under systemd (``Type=notify``): READY=1 once the schema is migrated, the
listeners are bound and the signal handlers are in place; STATUS= with the queue
size every ``metrics.status_interval``; WATCHDOG=1 from the event loop; STOPPING=1
when the drain begins.  The metrics endpoint (``[metrics] listen``) runs on the
same loop until the store closes.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import structlog
from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy.exc import DBAPIError

from backupmx import config as configuration
from backupmx import control, metrics, preflight
from backupmx.bounce.notices import Notices
from backupmx.deliver.callout import PrimaryCallout
from backupmx.deliver.client import Timeouts
from backupmx.deliver.deliverer import Deliverer, DeliverySettings
from backupmx.deliver.membership import Membership
from backupmx.deliver.pacer import Pacers
from backupmx.deliver.primaries import DomainPolicy, Primaries
from backupmx.deliver.route import Identity, local_addresses
from backupmx.deliver.schedule import expires_before, warns_before
from backupmx.mail.domains import DomainNames
from backupmx.mail.hosts import parse_host_port
from backupmx.notify import Notifier
from backupmx.queue.database import safe_url, upgrade
from backupmx.queue.nodes import NodeReport
from backupmx.queue.records import NewMessage, Overdue, utcnow
from backupmx.queue.state import Event
from backupmx.queue.store import Store
from backupmx.receive.anvil import Anvil
from backupmx.receive.policy import policy_from
from backupmx.receive.recipients import CacheKeeper, Verifier
from backupmx.receive.workers import ReceiverFailed, Receivers
from backupmx.resolver import Resolver

# How long one housekeeping run keeps sweeping overdue mail (500 recipients per
# transaction); what is left waits for the next run.
SWEEP_BUDGET = 30.0
log = structlog.get_logger("backupmx")


def node_name(hostname: str) -> str:
    """This process's node and lease owner name: stable per machine and configured
    hostname, so a restart gives back its own leases at once; at most 64 characters
    (the column), a digest standing for what does not fit."""
    name = f"{socket.gethostname()}:{hostname}"
    if len(name) <= 64:
        return name
    return name[:51] + "~" + hashlib.sha256(name.encode()).hexdigest()[:12]


def version() -> str:
    try:
        return importlib.metadata.version("backupmx")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class JobExecutor(AsyncIOExecutor):  # type: ignore[misc]
    """APScheduler's asyncio executor, except that its shutdown lets running jobs finish
    instead of cancelling them, and that their end can be awaited: a job cancelled in the
    middle of a query leaves a task behind that asyncio.run waits for forever at exit."""

    def __init__(self) -> None:
        super().__init__()
        self._running: list[asyncio.Future[Any]] = []
        self._stopped = asyncio.Event()

    def shutdown(self, wait: bool = True) -> None:
        # AsyncIOScheduler.shutdown calls this later, from the event loop (call_soon).
        self._running = [f for f in self._pending_futures if not f.done()]
        self._pending_futures.clear()
        self._stopped.set()

    async def finished(self, grace: float) -> None:
        """Wait for the jobs that were running at shutdown; cancel what outlasts `grace`."""
        await self._stopped.wait()
        if not self._running:
            return
        _, late = await asyncio.wait(self._running, timeout=grace)
        for job in late:
            job.cancel()
        await asyncio.gather(*late, return_exceptions=True)


class App:
    """Holds the running configuration; everything reads its part from here on use."""

    def __init__(self, config: configuration.Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.counts = metrics.QueueCounts(store)  # shared by the scrape and systemd's status
        self.notices = Notices(config.hostname, config.delivery.max_queue_lifetime)

    @property
    def config(self) -> configuration.Config:
        return self._config

    @config.setter
    def config(self, config: configuration.Config) -> None:
        """A new configuration (start, SIGHUP) and the [[domain]] entries matched on."""
        self._config = config
        self._domains = DomainNames((entry.name, entry) for entry in config.domain)

    def domain_policy(self, domain: str) -> DomainPolicy:
        """The [[domain]] entry for `domain`: its exact name, else the closest ".parent"."""
        delivery = self.config.delivery
        entry = self._domains.match(domain)
        if entry is None:
            return DomainPolicy(tls=delivery.tls)
        return DomainPolicy(
            backed_up=True,
            static_primary=entry.primary,
            on_primary_5xx=entry.on_primary_5xx,
            hold_window=entry.hold_window,
            tls=entry.tls or delivery.tls,
        )

    def membership(self, deliverer: Callable[[], Deliverer | None]) -> Membership:
        """This node among those sharing the queue; its heartbeat reports the `deliverer`'s
        counters once there is one."""
        config = self.config
        name = node_name(config.hostname)
        membership: Membership

        def describe() -> NodeReport:
            running = deliverer()
            in_flight = running.in_flight if running else 0
            delivered = running.delivered if running else 0
            return NodeReport(
                name,
                socket.gethostname(),
                version(),
                ", ".join(str(a) for a in config.listen_addresses()),
                os.getpid(),
                in_flight,
                delivered,
                membership.delivery_rate(delivered),
            )

        membership = Membership(self.store, name, config.delivery.lease, describe)
        return membership

    def primaries(self, membership: Membership) -> Primaries:
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
            membership,
        )

    def timeouts(self) -> Timeouts:
        delivery = self.config.delivery
        return Timeouts(
            delivery.connect_timeout,
            delivery.greeting_timeout,
            delivery.command_timeout,
            delivery.data_timeout,
        )

    def deliverer(self, primaries: Primaries, membership: Membership) -> Deliverer:
        delivery = self.config.delivery
        settings = DeliverySettings(
            helo=self.config.hostname,
            lease=delivery.lease,
            retry_min=delivery.retry_min,
            retry_max=delivery.retry_max,
            messages_per_connection=delivery.messages_per_connection,
            timeouts=self.timeouts(),
            ca_file=delivery.ca_file,
            max_recipients_in_flight=delivery.max_recipients_in_flight,
            claim_batch=delivery.claim_batch,
        )
        pacers = Pacers(
            delivery.initial_connections_per_host,
            delivery.max_connections_per_host,
            delivery.max_messages_per_second_per_host,
        )
        return Deliverer(
            self.store,
            primaries,
            pacers,
            self.notices.for_results,
            settings,
            membership,
        )

    async def housekeeping(self) -> None:
        """Expiry with DSNs, delay warnings, and the retention of finished messages and of
        other destinations' domain rows (every ``housekeeping_interval``).  Leases are
        the heartbeat's (`backupmx.deliver.membership`)."""
        delivery = self.config.delivery
        now = utcnow()
        expired = await self._sweep_all(
            Event.EXPIRE, self._expired, expires_before(now, delivery.max_queue_lifetime)
        )
        if expired:
            log.info("recipients_expired", count=expired)
        delayed = warns_before(now, delivery.delay_warning)
        if delayed is not None:
            warned = await self._sweep_all(None, self.notices.for_delayed, delayed)
            if warned:
                log.info("delay_warnings_queued", count=warned)
        forgotten = await self.store.forget_finished(
            now - timedelta(seconds=self.config.queue.keep_finished)
        )
        quiet = await self.store.forget_quiet_domains(keep=self._domains.covers)
        given_back = await self.store.give_back_space()
        if forgotten or quiet or given_back:
            log.info(
                "finished_forgotten",
                messages=forgotten,
                domains=quiet,
                bytes_given_back=given_back,
            )

    async def _sweep_all(
        self,
        event: Event | None,
        notices_for: Callable[[list[Overdue]], list[NewMessage]],
        older_than: datetime,
    ) -> int:
        """Sweep until nothing is left or `SWEEP_BUDGET` seconds have passed: a sweep
        takes a bounded number of recipients per transaction."""
        deadline = time.monotonic() + SWEEP_BUDGET
        total = 0
        while swept := await self.store.sweep(event, notices_for, older_than=older_than):
            total += swept
            if time.monotonic() > deadline:
                break
        return total

    def _expired(self, overdue: list[Overdue]) -> list[NewMessage]:
        metrics.recipients_expired(o.address for o in overdue)
        return self.notices.for_expired(overdue)

    async def report_status(self, notifier: Notifier) -> None:
        """STATUS= for `systemctl status`: the queue size and the primaries that are down."""
        try:
            view = await metrics.QueueView.read(self.counts)
        except Exception as error:
            notifier.status(f"queue database unreachable: {error}")
            return
        notifier.status(view.summary())


async def serve(config: configuration.Config, reload: Callable[[], configuration.Config]) -> None:
    problems = preflight.startup_problems(config)
    if problems:
        raise preflight.StartupFailure(problems)
    # Claimed first: a second serve on this queue stops here, before it touches the leases.
    channel = control.Channel(
        control.socket_path(config), config, node_name(config.hostname), version()
    )
    await channel.open()
    notifier = Notifier.from_environment()
    store = Store.open(config.database)
    endpoint: metrics.Endpoint | None = None
    try:
        try:
            await upgrade(store.engine)
        except DBAPIError as error:
            raise preflight.StartupFailure([preflight.unreachable(config, error)]) from error
        app = App(config, store)
        running: list[Deliverer] = []
        membership = app.membership(lambda: running[0] if running else None)
        await membership.join()
        await store.start()
        primaries = app.primaries(membership)
        deliverer = app.deliverer(primaries, membership)
        running.append(deliverer)
        primaries.on_up = deliverer.wake
        membership.on_lapse = deliverer.lapse
        membership.before_give_back = deliverer.record_unrecorded
        membership.on_taken_over = deliverer.wake
        membership.on_live = deliverer.share

        async def etrn(domain: str) -> int:
            due = await store.make_due(domain=domain, retry_down=True)
            deliverer.wake(domain)
            return due

        callout = PrimaryCallout(primaries.route, config.hostname, app.timeouts())
        anvil = Anvil(lambda: app.config.limits)
        assert store.intake is not None
        receivers = Receivers(config, anvil, Verifier(store, callout), etrn, store.intake.address)

        async def reloaded(new: configuration.Config) -> None:
            policy = policy_from(new)  # a certificate that does not load refuses the reload
            app.config = new
            channel.config = new
            metrics.follow(policy.relay_domains)
            await receivers.reload(new)

        # From here on a signal reloads or stops, also while the receivers start.
        signals = Signals(reloaded, reload)
        try:
            receivers.bind(config.listen_addresses())
        except OSError as error:  # taken since the check above
            addresses = ", ".join(config.listen)
            problem = preflight.not_bound("listen", addresses, error)
            raise preflight.StartupFailure([problem]) from error
        metrics.follow(policy_from(config).relay_domains)
        endpoint = metrics.Endpoint(
            metrics.Sources(
                app.counts,
                lambda: receivers.accepting,
                [str(a) for a in config.listen_addresses()],
                deliverer.pacers.windows,
                config.metrics.store_timeout,
                receivers.gather,
            )
        )
        try:
            await endpoint.start(config.metrics.listen)
        except OSError as error:
            problem = preflight.not_bound("metrics.listen", config.metrics.listen, error)
            raise preflight.StartupFailure([problem]) from error
        try:
            await receivers.start(config.receiver_count())
        except ReceiverFailed as error:
            await receivers.drain()
            problem = preflight.Problem("receivers", str(error), environment=True)
            raise preflight.StartupFailure([problem]) from error
        jobs = JobExecutor()
        scheduler = AsyncIOScheduler(executors={"default": jobs})
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
            seconds=config.delivery.housekeeping_interval,
            next_run_time=utcnow(),
            max_instances=1,
            coalesce=True,
        )
        scheduler.add_job(
            CacheKeeper(store, lambda: app.config).run,
            "interval",
            seconds=config.delivery.housekeeping_interval,
            max_instances=1,
            coalesce=True,
        )
        if notifier.address:
            scheduler.add_job(
                app.report_status,
                "interval",
                args=[notifier],
                seconds=config.metrics.status_interval,
                next_run_time=utcnow(),  # jobs start from the loop, after READY=1 below
                max_instances=1,
                coalesce=True,
            )
        scheduler.start()
        heartbeat = asyncio.get_running_loop().create_task(membership.run(), name="heartbeat")
        delivering = asyncio.get_running_loop().create_task(
            _deliver_once_counted(membership, deliverer), name="deliverer"
        )
        watchdog = asyncio.get_running_loop().create_task(notifier.run_watchdog(), name="watchdog")
        log.info(
            "started",
            hostname=config.hostname,
            database=safe_url(config.database),
            domains=[d.name for d in config.domain],
        )

        channel.running = control.Running(
            lambda: receivers.accepting, membership.holds, lambda: metrics.store_problem(store)
        )
        notifier.ready("accepting mail on " + ", ".join(config.listen))
        await signals.stopped()
        notifier.stopping("draining: finishing sessions in DATA")
        scheduler.pause()  # no new runs from here; running ones finish during the drain
        scheduler.shutdown(wait=False)
        await receivers.drain()
        await jobs.finished(config.limits.drain_timeout)
        await primaries.close()
        delivering.cancel()
        watchdog.cancel()
        await asyncio.gather(delivering, watchdog, return_exceptions=True)
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        await membership.leave()
        log.info("stopped")
    finally:
        await channel.close()
        if endpoint is not None:
            await endpoint.close()
        await store.close()
        notifier.close()


async def _deliver_once_counted(membership: Membership, deliverer: Deliverer) -> None:
    await membership.counted()
    await deliverer.run()


class Signals:
    """SIGHUP reloads the configuration (a file with errors is refused and the running one
    kept; reloads run one at a time, and ``reloaded`` is logged once every receiver
    worker has the new one); SIGTERM and SIGINT stop.  Installed before the receivers
    start, so that a signal during start-up is never the default action (death)."""

    def __init__(
        self,
        apply: Callable[[configuration.Config], Awaitable[None]],
        reload: Callable[[], configuration.Config],
    ) -> None:
        self._apply = apply
        self._reload = reload
        self._stop = asyncio.Event()
        self._reloading = asyncio.Lock()
        self._reloads: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._hangup)
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)

    def _hangup(self) -> None:
        task = asyncio.get_running_loop().create_task(self._reloaded())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reloaded(self) -> None:
        async with self._reloading:
            try:
                new = self._reload()
                await self._apply(new)
            except (configuration.ConfigError, OSError, ValueError) as error:
                log.error("reload_refused", error=str(error))
                return
            log.info("reloaded", domains=[d.name for d in new.domain])

    async def stopped(self) -> None:
        await self._stop.wait()
        log.info("stopping")
        # The handlers stay for the drain that follows: a second SIGTERM, or logrotate's
        # SIGHUP, must not kill a process that is finishing sessions in DATA.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: log.info("already_stopping"))
