"""Prometheus metrics and ``/healthz`` for ``serve``, on their own address (``[metrics] listen``).

Two kinds of figures:

* Events — counters and histograms fed by one-line calls from the stages:
  `connection_opened` and `recipient_rejected` (receive, per connection and RCPT),
  `recipient_unverified` (receive, a callout that got no answer),
  `message_answered` (receive, the reply to the end of DATA, with the accept
  latency), `recipient_result` and `message_sent` (deliver), `recipients_expired`
  (the housekeeping sweep), `spam_verdict` (the spam-check hook).
* State — queue sizes, oldest message, primary up/down per domain, whether a
  backed-up domain's own MX lookup fails (`dns_failing`), the database's
  size and the free space beside it.  Only the database knows them (the CLI
  changes the queue, and several nodes may share it), so they are read from the
  store at each scrape (`QueueView`), never counted in memory; the counts, whose
  cost grows with the queue, are reused while they are costly (`QueueCounts`).  A store that
  cannot be read within ``store_timeout`` leaves them out and sets
  ``backupmx_store_up 0``.

Every label set is bounded by the configuration or by a table here, never by the
mail: domain labels are the backed-up domains as configured (`follow`; a
subdomain under a ``.parent`` entry is counted as that entry), and every other
destination (the senders' domains our DSNs go to) is ``other``; ``reason`` labels
are enhanced status codes of our own replies; hosts are the deliverer's pacers,
which it bounds.

``/healthz`` answers ``200`` when the process runs, the store answers and the
listener is bound and accepting, ``503`` otherwise, with a JSON body saying which.
The endpoint is a small asyncio HTTP/1.1 server on the application's event loop,
so a scrape sees the same objects the server uses, without threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from backupmx.mail.address import RelayDomains
from backupmx.mail.domains import normalize_domain
from backupmx.mail.hosts import parse_host_port
from backupmx.queue.database import current_revision, missing_sqlite_file
from backupmx.queue.domains import dns_failing
from backupmx.queue.records import DomainState, Stats, utcnow, waiting
from backupmx.queue.space import Footprint
from backupmx.queue.state import PrimaryState
from backupmx.queue.store import Store

log = structlog.get_logger("backupmx")

OTHER = "other"  # the label of every destination that is not a backed-up domain
REQUEST_TIMEOUT = 10.0  # a scraper that sends no complete request line within this is cut
MAX_REQUEST_HEAD = 8192  # request line and headers; we read nothing else

# No *_created series: a sample per series that Prometheus' text format does not use.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_* memory, CPU, open files, start time

CONNECTIONS = Counter(
    "backupmx_connections",
    "SMTP connections, by whether they were admitted or refused (connection limits, draining)",
    ["result"],
    registry=REGISTRY,
)
MESSAGES_ACCEPTED = Counter(
    "backupmx_messages_accepted",
    "Messages answered 250 after DATA (committed to the queue)",
    registry=REGISTRY,
)
MESSAGES_REJECTED = Counter(
    "backupmx_messages_rejected",
    "Messages refused after DATA, by reason (too_big, mail_loop, storage_error, …)",
    ["reason"],
    registry=REGISTRY,
)
RECIPIENTS_REJECTED = Counter(
    "backupmx_recipients_rejected",
    "RCPT commands refused, by reason (denied: not a backed-up domain, bad_address, …)",
    ["reason"],
    registry=REGISTRY,
)
RECIPIENTS = Counter(
    "backupmx_recipients",
    "Delivery results per destination domain: delivered, deferred, bounced, held, expired",
    ["domain", "result"],
    registry=REGISTRY,
)
SPAM_VERDICTS = Counter(
    "backupmx_spam_verdicts",
    "Spam-check verdicts, by the action taken",
    ["action"],
    registry=REGISTRY,
)
ACCEPT_LATENCY = Histogram(
    "backupmx_accept_latency_seconds",
    "End of DATA to the 250 reply, the durable group commit included",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
QUEUE_TIME = Histogram(
    "backupmx_queue_time_seconds",
    "Receipt to delivery to the primary, for delivered recipients",
    buckets=(1, 10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 2 * 86400, 5 * 86400),
    registry=REGISTRY,
)
DELIVERY_LATENCY = Histogram(
    "backupmx_delivery_latency_seconds",
    "One message's SMTP transaction with a primary (MAIL to the reply to DATA)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
QUEUE_MESSAGES = Gauge(
    "backupmx_queue_messages",
    "Messages with at least one recipient still pending",
    registry=REGISTRY,
)
QUEUE_RECIPIENTS = Gauge(
    "backupmx_queue_recipients",
    "Pending recipients by destination domain and state (queued, sending, held)",
    ["domain", "state"],
    registry=REGISTRY,
)
COUNTS_AGE = Gauge(
    "backupmx_queue_counts_age_seconds",
    "How old the queue counts in this scrape are (reused while they are costly to read)",
    registry=REGISTRY,
)
OLDEST_MESSAGE = Gauge(
    "backupmx_queue_oldest_message_age_seconds",
    "Age of the oldest message with a pending recipient, per destination domain",
    ["domain"],
    registry=REGISTRY,
)
PRIMARY_UP = Gauge(
    "backupmx_primary_up",
    "1 if the domain's primary took mail or answered the last probe, 0 if it is down",
    ["domain"],
    registry=REGISTRY,
)
PRIMARY_SINCE = Gauge(
    "backupmx_primary_state_since_timestamp_seconds",
    "When the domain's primary entered its current state (up or down), Unix time",
    ["domain"],
    registry=REGISTRY,
)
DNS_FAILING = Gauge(
    "backupmx_domain_dns_failing",
    "1 while the backed-up domain's MX lookup fails (NXDOMAIN, SERVFAIL, timeout) and its"
    " mail is held for it, 0 otherwise",
    ["domain"],
    registry=REGISTRY,
)
RECIPIENTS_UNVERIFIED = Counter(
    "backupmx_recipients_unverified",
    'RCPTs of recipients = "verify" the primary could not confirm, by the answer given:'
    " accepted (verify_unknown = accept) or deferred (450 4.2.1)",
    ["domain", "answer"],
    registry=REGISTRY,
)
HOST_CONCURRENCY = Gauge(
    "backupmx_host_concurrency",
    "Per-primary-host connection window of the adaptive pacing (this node)",
    ["host"],
    registry=REGISTRY,
)
STORE_UP = Gauge(
    "backupmx_store_up",
    "1 if this scrape could read the queue database within metrics.store_timeout",
    registry=REGISTRY,
)
LISTENER_UP = Gauge(
    "backupmx_listener_up",
    "1 while the SMTP listener is bound and accepting, 0 while draining",
    registry=REGISTRY,
)
NODES_LIVE = Gauge(
    "backupmx_nodes_live",
    "Nodes sharing the queue whose heartbeat is within the lease, this one included",
    registry=REGISTRY,
)
FENCE_UP = Gauge(
    "backupmx_fence_up",
    "1 while this node's last heartbeat is recent enough for it to send, 0 after a lapse",
    registry=REGISTRY,
)
LEASES_TAKEN_OVER = Counter(
    "backupmx_leases_taken_over_total",
    "Recipients this node gave back to the queue from nodes it found dead",
    registry=REGISTRY,
)


# The counts the receiver workers keep, each in its own process (`received_samples`);
# serve's scrape adds them up (`ReceivedCounts`).
RECEIVED = (
    CONNECTIONS,
    MESSAGES_ACCEPTED,
    MESSAGES_REJECTED,
    RECIPIENTS_REJECTED,
    SPAM_VERDICTS,
    ACCEPT_LATENCY,
    RECIPIENTS_UNVERIFIED,
)
# family name -> (sample name, labels) -> value, in the order collected
Samples = dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]


def received_samples() -> Samples:
    """This process's receiving counts: a receiver worker's answer to a scrape."""
    samples: Samples = {}
    for metric in RECEIVED:
        for family in metric.collect():
            samples[family.name] = {
                (s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples
            }
    return samples


class ReceivedCounts:
    """The receiving counts of every receiver worker, summed at each scrape.

    `install` puts this collector in the registry in place of the serve process's own
    receiving metrics.  A worker that exits leaves its last counts behind (`retire`),
    so the totals never go down when a worker is replaced; what it counted after its
    last scrape is lost with it.
    """

    def __init__(self) -> None:
        self.live: dict[int, Samples] = {}
        self._retired: Samples = {}

    def install(self) -> None:
        for metric in RECEIVED:
            REGISTRY.unregister(metric)
        REGISTRY.register(self)

    def uninstall(self) -> None:
        REGISTRY.unregister(self)
        for metric in RECEIVED:
            REGISTRY.register(metric)

    def retire(self, worker: int) -> None:
        _add(self._retired, self.live.pop(worker, {}))

    def collect(self) -> Iterator[Metric]:
        totals: Samples = {}
        for samples in (self._retired, *self.live.values()):
            _add(totals, samples)
        for metric in RECEIVED:
            for own in metric.collect():
                family = Metric(own.name, own.documentation, own.type)
                if own.name not in totals:  # no worker has answered yet: this process's zeros
                    family.samples = list(own.samples)
                for (name, labels), value in totals.get(own.name, {}).items():
                    family.add_sample(name, dict(labels), value)
                yield family


def _add(totals: Samples, samples: Samples) -> None:
    for family, values in samples.items():
        into = totals.setdefault(family, {})
        for key, value in values.items():
            into[key] = into.get(key, 0.0) + value


class FootprintGauges:
    """``backupmx_queue_database_bytes`` and ``backupmx_queue_filesystem_free_bytes``
    from the last read of the store.  A collector rather than two `Gauge`s, so that
    each is absent while unknown: a 0 would read as a full disk (and page someone)."""

    def __init__(self) -> None:
        self.known: Footprint | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        size = GaugeMetricFamily(
            "backupmx_queue_database_bytes",
            "Size of the queue database: SQLite's file and its WAL on disk, "
            "or PostgreSQL's pg_database_size",
        )
        free = GaugeMetricFamily(
            "backupmx_queue_filesystem_free_bytes",
            "Bytes free to backupmx on the filesystem of the SQLite queue (absent for PostgreSQL)",
        )
        if self.known is not None:
            size.add_metric([], self.known.database_bytes)
            if self.known.free_bytes is not None:
                free.add_metric([], self.known.free_bytes)
        yield size
        yield free


FOOTPRINT = FootprintGauges()
REGISTRY.register(FOOTPRINT)

# Enhanced status codes (RFC 3463) of our refusals, as label values.
_REASONS = {
    "5.3.4": "too_big",
    "5.6.0": "bare_newline",
    "5.4.6": "mail_loop",
    "4.3.0": "storage_error",
    "4.3.1": "storage_full",
    "5.7.1": "denied",  # relaying, DNSBL, spam: the spam verdicts have their own counter
    "4.7.1": "policy_deferred",  # rate limits, greylisting, spam filter deferral
    "4.7.0": "too_many_connections",
    "5.5.0": "protocol",
    "5.1.1": "unknown_recipient",
    "5.1.2": "bad_address",
    "5.1.3": "bad_address",
    "5.5.4": "bad_parameters",
    "5.6.7": "needs_smtputf8",
    "4.5.3": "too_many_recipients",
}
_ENHANCED_CODE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")  # RFC 3463 class.subject.detail

_backed_up = RelayDomains(())


# --------------------------------------------------------------------------- event hooks


def follow(domains: RelayDomains) -> None:
    """The backed-up domains, for domain labels (at start-up and on every reload)."""
    global _backed_up
    _backed_up = domains


def clock() -> float:
    return time.monotonic()


def connection_opened(refusal: str | None) -> None:
    CONNECTIONS.labels("refused" if refusal else "accepted").inc()


def recipient_rejected(reply: str) -> None:
    RECIPIENTS_REJECTED.labels(reason(reply)).inc()


def recipient_unverified(domain: str, accepted: bool) -> None:
    RECIPIENTS_UNVERIFIED.labels(domain_label(domain), "accepted" if accepted else "deferred").inc()


def message_answered(reply: str, data_ended: float) -> None:
    """The reply to the end of DATA: 250 is an accepted message, anything else a rejection."""
    if reply.startswith("250"):
        MESSAGES_ACCEPTED.inc()
        ACCEPT_LATENCY.observe(time.monotonic() - data_ended)
    else:
        MESSAGES_REJECTED.labels(reason(reply)).inc()


def heartbeat(live: int, fence: bool, taken_over: int) -> None:
    NODES_LIVE.set(live)
    FENCE_UP.set(1 if fence else 0)
    LEASES_TAKEN_OVER.inc(taken_over)


def message_sent(started: float) -> None:
    DELIVERY_LATENCY.observe(time.monotonic() - started)


def recipient_result(domain: str, result: str, received_at: datetime) -> None:
    RECIPIENTS.labels(domain_label(domain), result).inc()
    if result == "delivered":
        QUEUE_TIME.observe((utcnow() - received_at).total_seconds())


def recipients_expired(addresses: Iterable[str]) -> None:
    for address in addresses:
        RECIPIENTS.labels(domain_label(address.rpartition("@")[2]), "expired").inc()


def spam_verdict(action: str) -> None:
    SPAM_VERDICTS.labels(action).inc()


def reason(reply: str) -> str:
    """'552 5.3.4 Error: …' -> 'too_big'; an unknown enhanced code is its own label, and a
    reply without one is labelled by its basic code (the text after it is never a label)."""
    status = reply[4:].split(" ", 1)[0]
    if status in _REASONS:
        return _REASONS[status]
    return status if _ENHANCED_CODE.fullmatch(status) else reply[:3]


def domain_label(domain: str) -> str:
    """The configured name that backs `domain` up: its exact entry, or for a subdomain
    its ``.parent`` entry (``x.example.org`` -> ``.example.org``); ``other`` for any
    other destination.  Bound: the configured names plus ``other``, whatever the mail."""
    try:
        name = normalize_domain(domain)
    except ValueError:
        return OTHER
    entry = _backed_up.match(name)
    if entry is None:
        return OTHER
    return "." + normalize_domain(entry[1:]) if entry.startswith(".") else name


# --------------------------------------------------------------------------- queue state


class QueueCounts:
    """The queue's counts (`Store.stats`), read no more often than their cost allows.

    The counts are grouped queries over every pending recipient and the finished
    records, so their cost grows with what is held (about a second on SQLite for
    1,000,000 held recipients).  Prometheus scrapes every 15 s and systemd's status
    asks every ``status_interval``: read each time, a long outage's idle cost would
    grow with the queue.  So a read that took t seconds is reused for ``REUSE`` × t,
    which bounds the counting to 1 % of a core whoever asks; a read under
    ``ALWAYS_FRESH`` is not reused at all (a small queue's counts are always
    current).  The scrape says their age (``backupmx_queue_counts_age_seconds``).
    One instance per process, shared by every reader; one read at a time.
    """

    REUSE = 99.0
    ALWAYS_FRESH = 0.05  # seconds

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self._clock = clock
        self._lock = asyncio.Lock()
        self._last: Stats | None = None
        self._read_at = 0.0
        self._fresh_until = 0.0

    async def read(self) -> tuple[Stats, float]:
        """The counts and their age in seconds."""
        async with self._lock:
            now = self._clock()
            if self._last is None or now >= self._fresh_until:
                self._last = await self.store.stats()
                done = self._clock()
                cost = done - now
                self._read_at = done
                self._fresh_until = done + (cost * self.REUSE if cost >= self.ALWAYS_FRESH else 0)
            return self._last, self._clock() - self._read_at


@dataclass(frozen=True)
class QueueView:
    """What the queue database says right now: counts, oldest messages, primaries,
    and the disk it takes."""

    stats: Stats
    states: dict[str, DomainState]
    footprint: Footprint
    counts_age: float = 0.0  # seconds since `stats` was read (`QueueCounts`)

    @classmethod
    async def read(cls, counts: QueueCounts) -> QueueView:
        stats, age = await counts.read()
        store = counts.store
        return cls(stats, await store.domain_states(), await store.footprint(), age)

    def summary(self) -> str:
        """One line for systemd's STATUS=: queue size and the primaries that are down."""
        counts = self.stats.recipients
        text = (
            f"queue: {self.stats.messages} message(s), {waiting(counts)} recipient(s) waiting, "
            f"{counts.get('held', 0)} held"
        )
        down = sorted(
            n for n, s in self.states.items() if s.state == PrimaryState.DOWN and _is_ours(n)
        )
        if down:
            text += "; primary down: " + ", ".join(down)
        return text

    def export(self) -> None:
        """Set the state gauges from this view (the previous scrape's series are dropped)."""
        now = utcnow()
        QUEUE_MESSAGES.set(self.stats.messages)
        COUNTS_AGE.set(self.counts_age)
        pending: dict[tuple[str, str], int] = {}
        oldest: dict[str, datetime] = {}
        for entry in self.stats.domains:
            label = domain_label(entry.domain)
            for state, count in entry.counts.items():
                pending[label, state] = pending.get((label, state), 0) + count
            if entry.oldest and (label not in oldest or entry.oldest < oldest[label]):
                oldest[label] = entry.oldest
        QUEUE_RECIPIENTS.clear()
        for (label, state), count in pending.items():  # every pending state, zeros included
            QUEUE_RECIPIENTS.labels(label, state).set(count)
        OLDEST_MESSAGE.clear()
        for label, when in oldest.items():
            OLDEST_MESSAGE.labels(label).set((now - when).total_seconds())
        PRIMARY_UP.clear()
        PRIMARY_SINCE.clear()
        DNS_FAILING.clear()
        for name, known in self.states.items():
            if not _is_ours(name):
                continue
            DNS_FAILING.labels(name).set(1 if dns_failing(known) else 0)
            if known.state in (PrimaryState.UP, PrimaryState.DOWN):
                PRIMARY_UP.labels(name).set(1 if known.state == PrimaryState.UP else 0)
                PRIMARY_SINCE.labels(name).set(known.since.timestamp())
        FOOTPRINT.known = self.footprint


def _is_ours(domain: str) -> bool:
    return domain_label(domain) != OTHER


def clear_queue_gauges() -> None:
    QUEUE_MESSAGES.set(0)
    for gauge in (QUEUE_RECIPIENTS, OLDEST_MESSAGE, PRIMARY_UP, PRIMARY_SINCE, DNS_FAILING):
        gauge.clear()
    FOOTPRINT.known = None


async def store_problem(store: Store) -> str | None:
    """None if the queue database answers, else what is wrong with it."""
    # An open SQLite connection keeps reading a file that was moved or deleted; the
    # next process (or the CLI) would find an empty queue: that is down too.
    missing = missing_sqlite_file(store.url)
    if missing:
        return f"the queue file {missing} is missing"
    try:
        await current_revision(store.engine)
    except Exception as error:
        return " ".join(str(getattr(error, "orig", None) or error).split())
    return None


# --------------------------------------------------------------------------- endpoint


async def _nothing_to_gather() -> None:
    pass


@dataclass(frozen=True)
class Sources:
    """What the endpoint reads, handed over by the composition root."""

    counts: QueueCounts  # the store, and its counts as often as they may be read
    listening: Callable[[], bool]  # the SMTP listener is bound and not draining
    addresses: list[str]  # the SMTP listen addresses
    windows: Callable[[], dict[str, float]]  # per-host pacing windows (Pacers.windows)
    store_timeout: float
    # Asks the receiver workers for their counts (`ReceivedCounts`) before a scrape.
    gather: Callable[[], Awaitable[None]] = _nothing_to_gather


class Endpoint:
    """``GET /metrics`` (Prometheus text format) and ``GET /healthz`` (JSON)."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        self.started = time.time()
        self._server: asyncio.Server | None = None
        self._requests: set[asyncio.Task[Any]] = set()

    async def start(self, listen: str) -> None:
        """Listen on ``metrics.listen`` ("" = off).  An address that cannot be bound raises
        OSError and `serve` does not start: a server its monitoring cannot see would look
        down, or a stranger on the port would answer for it."""
        if not listen:
            return
        address = parse_host_port(listen)
        self._server = await asyncio.start_server(
            self._serve, address.host, address.port, reuse_address=True, limit=MAX_REQUEST_HEAD
        )
        log.info("metrics_listening", host=address.host, port=address.port)

    async def close(self) -> None:
        """Stop listening and end the requests in progress: none may outlive the store."""
        if self._server is not None:
            self._server.close()
            for request in self._requests:
                request.cancel()
            await asyncio.gather(*self._requests, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def health(self) -> tuple[int, dict[str, Any]]:
        problem = await self._store_problem()
        bound = self.sources.listening()
        healthy = problem is None and bound
        body = {
            "status": "ok" if healthy else "unavailable",
            "process": {"pid": os.getpid(), "uptime_seconds": round(time.time() - self.started)},
            "store": {"reachable": problem is None, "error": problem},
            "listener": {"bound": bound, "addresses": self.sources.addresses},
        }
        return (200 if healthy else 503), body

    async def scrape(self) -> bytes:
        await self.sources.gather()
        try:
            view = await asyncio.wait_for(
                QueueView.read(self.sources.counts), self.sources.store_timeout
            )
        except Exception as error:
            log.warning("metrics_store_unreadable", error=str(error) or type(error).__name__)
            STORE_UP.set(0)
            clear_queue_gauges()
        else:
            STORE_UP.set(1)
            view.export()
        LISTENER_UP.set(1 if self.sources.listening() else 0)
        HOST_CONCURRENCY.clear()
        for host, window in self.sources.windows().items():
            HOST_CONCURRENCY.labels(host).set(window)
        return generate_latest(REGISTRY)

    async def _store_problem(self) -> str | None:
        try:
            return await asyncio.wait_for(
                store_problem(self.sources.counts.store), self.sources.store_timeout
            )
        except TimeoutError:
            return f"no answer within {self.sources.store_timeout:g}s"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)
        try:
            method, path = await asyncio.wait_for(_read_request(reader), REQUEST_TIMEOUT)
            status, content_type, body = await self._respond(method, path)
            head = (
                f"HTTP/1.1 {status} {_REASON_PHRASES[status]}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
            pass  # a client that went away or sent garbage gets nothing more
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"GET or HEAD only\n"
        route = path.split("?", 1)[0]
        if route == "/metrics":
            return 200, CONTENT_TYPE_LATEST, await self.scrape()
        if route == "/healthz":
            status, body = await self.health()
            return status, "application/json", (json.dumps(body) + "\n").encode()
        return 404, "text/plain; charset=utf-8", b"try /metrics or /healthz\n"


_REASON_PHRASES = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """The method and path of one request; the headers are read and ignored."""
    parts = (await reader.readline()).decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError("not an HTTP request")
    while (await reader.readline()).strip():
        pass
    return parts[0], parts[1]
