"""The composition root: build the store and the receiver, run them on one event loop.

Start-up: migrate the queue schema, give back leases this host left behind,
start the group-commit writer, bind the listeners.  SIGHUP reloads the
configuration file (domains, limits, TLS certificate); a file with errors is
refused and the running configuration kept.  SIGTERM/SIGINT drain the listener
(design.md §4) and close the store, so nothing is left half-written.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable

import structlog

from backupmx import config as configuration
from backupmx.queue.database import upgrade
from backupmx.queue.store import Store
from backupmx.receive.listener import Listener, policy_from

log = structlog.get_logger("backupmx")


def node_name(hostname: str) -> str:
    """This process's lease owner name: stable per host, so a restart reclaims its own leases."""
    return f"{socket.gethostname()}:{hostname}"


async def serve(config: configuration.Config, reload: Callable[[], configuration.Config]) -> None:
    store = Store.open(config.database)
    try:
        await upgrade(store.engine)
        released = await store.release_leases(node_name(config.hostname))
        if released:
            log.info("leases_reclaimed", recipients=released)
        store.start()
        listener = Listener(policy_from(config), store)
        addresses = [(a.host, a.port) for a in config.listen_addresses()]
        await listener.start(addresses)
        log.info(
            "started",
            hostname=config.hostname,
            database=_safe_url(config.database),
            domains=[d.name for d in config.domain],
        )
        await _run_until_stopped(listener, reload)
        await listener.drain()
        log.info("stopped")
    finally:
        await store.close()


async def _run_until_stopped(
    listener: Listener, reload: Callable[[], configuration.Config]
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_hup() -> None:
        try:
            new = reload()
            listener.reload(policy_from(new))
        except (configuration.ConfigError, OSError, ValueError) as error:
            log.error("reload_refused", error=str(error))
            return
        log.info("reloaded", domains=[d.name for d in new.domain])

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopping")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
