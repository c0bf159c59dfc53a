"""The pure parts of the metrics: reply reasons, domain labels, the queue summary line,
and a scrape over a stand-in store.

No server and no HTTP: `metrics.reason` names a refusal by its enhanced status
code, `metrics.domain_label` keeps label values to the backed-up domains as
configured (and ``other``), `QueueView.summary` is the one line STATUS= and the
log carry, and `Endpoint.scrape` reads the store within ``store_timeout``.
The endpoint itself, scraped from a real ``backupmx serve``, is in
tests/integration/test_metrics.py.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from prometheus_client.parser import text_string_to_metric_families

from backupmx import metrics
from backupmx.mail.address import RelayDomains
from backupmx.queue.records import DomainState, DomainStats, Stats, utcnow
from backupmx.queue.space import Footprint

EMPTY = Stats(0, {"queued": 0, "sending": 0, "held": 0}, None, [])


def test_reply_reasons_are_named_by_enhanced_status_code() -> None:
    assert metrics.reason("552 5.3.4 Error: message size exceeds fixed limit") == "too_big"
    assert metrics.reason("451 4.3.0 Error: queue file write error") == "storage_error"
    assert metrics.reason("550 5.7.1 Relay access denied") == "denied"
    assert metrics.reason("550 5.9.9 something new") == "5.9.9"
    # Text after the basic code never becomes a label: the label set stays bounded.
    assert metrics.reason("554 Transaction failed") == "554"
    assert metrics.reason("451 user@example.com tried later") == "451"


def test_domain_labels_are_the_backed_up_domains_and_other() -> None:
    metrics.follow(RelayDomains(["example.com", ".example.org"]))
    try:
        assert metrics.domain_label("EXAMPLE.com") == "example.com"
        # A subdomain counts as the entry that backs it up: however many subdomains
        # the mail names, the labels are the configured names.
        assert metrics.domain_label("mx.example.org") == ".example.org"
        assert metrics.domain_label("a.b.EXAMPLE.org") == ".example.org"
        assert metrics.domain_label("sender.test") == metrics.OTHER
        assert metrics.domain_label("not a domain") == metrics.OTHER
    finally:
        metrics.follow(RelayDomains(()))


def test_queue_summary_names_the_primaries_that_are_down() -> None:
    metrics.follow(RelayDomains(["example.com", "example.net"]))
    try:
        now = utcnow()
        stats = Stats(
            3,
            {"queued": 4, "sending": 1, "held": 2, "delivered": 9, "bounced": 0, "expired": 0},
            now,
            [DomainStats("example.com", {"queued": 4, "sending": 1, "held": 2}, now)],
        )
        states = {
            name: DomainState(name, state, now - timedelta(hours=1), None, None, None, None)
            for name, state in [("example.com", "down"), ("example.net", "up"), ("x.test", "down")]
        }
        summary = metrics.QueueView(stats, states, Footprint(0, None)).summary()
    finally:
        metrics.follow(RelayDomains(()))
    assert summary == (
        "queue: 3 message(s), 5 recipient(s) waiting, 2 held; primary down: example.com"
    )


def test_dns_failing_is_1_only_for_a_backed_up_domain_held_for_its_mx_lookup() -> None:
    metrics.follow(RelayDomains(["example.com", "example.net", "example.org"]))
    try:
        now = utcnow()
        states = {
            name: DomainState(name, state, now, None, reason, None, None)
            for name, state, reason in [
                ("example.com", "down", "DNS: MX lookup of example.com: no such domain (NXDOMAIN)"),
                ("example.net", "down", "127.0.0.2:25: connection refused"),
                ("example.org", "up", None),
                ("x.test", "down", "DNS: MX lookup of x.test: SERVFAIL"),  # not backed up
            ]
        }
        metrics.QueueView(EMPTY, states, Footprint(0, None)).export()
        samples = {
            sample.labels["domain"]: sample.value
            for family in text_string_to_metric_families(
                metrics.generate_latest(metrics.REGISTRY).decode()
            )
            if family.name == "backupmx_domain_dns_failing"
            for sample in family.samples
        }
    finally:
        metrics.follow(RelayDomains(()))
        metrics.clear_queue_gauges()
    assert samples == {"example.com": 1, "example.net": 0, "example.org": 0}


class StandInStore:
    """What `QueueView.read` asks of the store; `footprint` may never answer."""

    def __init__(self, footprint: Footprint | None) -> None:
        self._footprint = footprint

    async def stats(self) -> Stats:
        return EMPTY

    async def domain_states(self) -> dict[str, DomainState]:
        return {}

    async def footprint(self) -> Footprint:
        if self._footprint is None:
            await asyncio.Event().wait()  # a database that does not answer
        assert self._footprint is not None
        return self._footprint


async def scrape(footprint: Footprint | None) -> dict[str, float]:
    endpoint = metrics.Endpoint(
        metrics.Sources(
            metrics.QueueCounts(StandInStore(footprint)),  # type: ignore[arg-type]
            lambda: True,
            [],
            dict,
            store_timeout=0.05,
        )
    )
    text = (await endpoint.scrape()).decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


async def test_scrape_shows_the_database_size_and_the_free_space_beside_it() -> None:
    samples = await scrape(Footprint(123_456, 9_876_543_210))
    assert samples["backupmx_store_up"] == 1
    assert samples["backupmx_queue_database_bytes"] == 123_456
    assert samples["backupmx_queue_filesystem_free_bytes"] == 9_876_543_210


async def test_free_space_is_absent_when_unknown_never_zero() -> None:
    on_postgresql = await scrape(Footprint(8_000_000, None))
    assert on_postgresql["backupmx_queue_database_bytes"] == 8_000_000
    assert "backupmx_queue_filesystem_free_bytes" not in on_postgresql
    await scrape(Footprint(1, 2))
    silent = await scrape(None)  # the store does not answer within store_timeout
    assert silent["backupmx_store_up"] == 0
    assert "backupmx_queue_database_bytes" not in silent
    assert "backupmx_queue_filesystem_free_bytes" not in silent


class Clock:
    """The monotonic clock of `QueueCounts`: it moves when a count takes time or the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CostlyCounts:
    """A store whose counts take `cost` seconds on `clock` and number each read."""

    def __init__(self, clock: Clock, cost: float) -> None:
        self.clock, self.cost, self.reads = clock, cost, 0

    async def stats(self) -> Stats:
        self.reads += 1
        await asyncio.sleep(0)  # a real read yields to the loop
        self.clock.now += self.cost
        return Stats(self.reads, EMPTY.recipients, None, [])


async def test_costly_counts_are_reused_for_99_times_their_cost() -> None:
    clock = Clock()
    store = CostlyCounts(clock, cost=2.0)  # a large queue: 2 s per count
    counts = metrics.QueueCounts(store, clock)  # type: ignore[arg-type]
    stats, age = await counts.read()
    assert (stats.messages, age) == (1, 0.0)
    clock.now += 150.0
    stats, age = await counts.read()  # within 99 × 2 s: the same counts, with their age
    assert (stats.messages, age) == (1, 150.0)
    clock.now += 48.0
    stats, age = await counts.read()  # 198 s after: read again
    assert (stats.messages, age) == (2, 0.0)
    # Over a long idle hour scraped every 15 s, counting takes at most 1 % of the time.
    start, reads = clock.now, store.reads
    for _ in range(240):
        clock.now += 15.0
        await counts.read()
    assert (store.reads - reads) * store.cost <= 0.01 * (clock.now - start)


async def test_cheap_counts_are_read_every_time_and_once_for_concurrent_readers() -> None:
    clock = Clock()
    store = CostlyCounts(clock, cost=0.01)  # a small queue
    counts = metrics.QueueCounts(store, clock)  # type: ignore[arg-type]
    assert [(await counts.read())[0].messages for _ in range(3)] == [1, 2, 3]
    store.cost = 5.0
    together = await asyncio.gather(counts.read(), counts.read())  # scrape and STATUS= at once
    assert [stats.messages for stats, _ in together] == [4, 4]
    assert store.reads == 4


def test_the_receivers_counts_are_added_up_and_a_replaced_one_never_lowers_them() -> None:
    """Each receiver worker counts in its own process; serve's scrape shows the sums, and
    a worker that exited leaves its last counts in them."""
    metrics.CONNECTIONS.labels("accepted").inc(0)  # the label set exists in every worker
    baseline = metrics.received_samples()
    counts = metrics.ReceivedCounts()
    counts.install()
    try:

        def worker(accepted: float, refused: float) -> metrics.Samples:
            samples = {family: dict(values) for family, values in baseline.items()}
            connections = samples["backupmx_connections"]
            connections[("backupmx_connections_total", (("result", "accepted"),))] = accepted
            connections[("backupmx_connections_total", (("result", "refused"),))] = refused
            return samples

        def scraped() -> dict[str, float]:
            text = metrics.generate_latest(metrics.REGISTRY).decode()
            return {
                sample.labels["result"]: sample.value
                for family in text_string_to_metric_families(text)
                if family.name == "backupmx_connections"
                for sample in family.samples
            }

        counts.live = {0: worker(5, 1), 1: worker(7, 0)}
        assert scraped() == {"accepted": 12, "refused": 1}
        counts.retire(1)  # worker 1 exited; its replacement starts from zero
        counts.live[1] = worker(2, 0)
        assert scraped() == {"accepted": 14, "refused": 1}
    finally:
        counts.uninstall()
