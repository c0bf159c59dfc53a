"""Metrics and health: a real `backupmx serve`, scraped over HTTP and parsed with prometheus_client.

The integration tests send real mail (smtplib) to a server whose primary
(127.0.0.1:9) refuses connections, then read ``/metrics`` with
``prometheus_client.parser`` and ``/healthz`` as JSON: counters for what
happened, gauges for what the queue holds, ``503`` once the queue database is
gone (a PostgreSQL database dropped under the server, an SQLite file moved away)
while the process keeps running.
"""

from __future__ import annotations

import json
import smtplib
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backupmx import metrics
from backupmx.mail.address import RelayDomains
from backupmx.queue.records import DomainState, DomainStats, Stats, utcnow
from tests.support.ports import free_port
from tests.support.server import DOMAIN, POSTGRES_ADMIN_URL, ServerProcess
from tests.support.waiting import wait_for_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def http(server: ServerProcess, path: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"http://{server.settings['metrics']['listen']}{path}", method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def scrape(server: ServerProcess) -> Samples:
    status, body = http(server, "/metrics")
    assert status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def healthz(server: ServerProcess) -> tuple[int, dict[str, Any]]:
    status, body = http(server, "/healthz")
    return status, json.loads(body)


def metered(server_factory: Any, **settings: Any) -> ServerProcess:
    port = free_port()
    server: ServerProcess = server_factory(
        metrics={"listen": f"127.0.0.1:{port}", "store_timeout": "3s"}, **settings
    )
    server.start()
    # The SMTP port opens first; the endpoint follows a moment later (seen under load).
    wait_for_port("127.0.0.1", port)
    return server


def wait_until(check: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


# --------------------------------------------------------------------------- pure parts


def test_reply_reasons_are_named_by_enhanced_status_code() -> None:
    assert metrics.reason("552 5.3.4 Error: message size exceeds fixed limit") == "too_big"
    assert metrics.reason("451 4.3.0 Error: queue file write error") == "storage_error"
    assert metrics.reason("550 5.7.1 Relay access denied") == "denied"
    assert metrics.reason("550 5.9.9 something new") == "5.9.9"


def test_domain_labels_are_the_backed_up_domains_and_other() -> None:
    metrics.follow(RelayDomains(["example.com", ".example.org"]))
    try:
        assert metrics.domain_label("EXAMPLE.com") == "example.com"
        assert metrics.domain_label("mx.example.org") == "mx.example.org"
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
        summary = metrics.QueueView(stats, states).summary()
    finally:
        metrics.follow(RelayDomains(()))
    assert summary == (
        "queue: 3 message(s), 5 recipient(s) waiting, 2 held; primary down: example.com"
    )


# --------------------------------------------------------------------------- backupmx serve


def test_scrape_counts_accepted_and_rejected_mail_and_shows_the_held_queue(
    server_factory: Any,
) -> None:
    server = metered(server_factory)
    before = scrape(server)
    assert value(before, "backupmx_store_up") == 1
    assert value(before, "backupmx_listener_up") == 1
    with smtplib.SMTP(server.host, server.port, timeout=20) as client:
        client.ehlo("client.test")
        client.sendmail(
            "a@sender.test", [f"one@{DOMAIN}", f"two@{DOMAIN}"], b"Subject: x\r\n\r\nx\r\n"
        )
        client.mail("b@sender.test")
        assert client.rcpt("victim@elsewhere.test")[0] == 550
        client.rset()
    # The primary refuses.  Either the first delivery attempt or the start-up probe
    # finds it down first (a race); a domain that is down is not tried again before
    # its retry time, so an operator's flush makes the attempt whose deferrals count.
    down = wait_until(
        lambda: (s := scrape(server)) and value(s, "backupmx_primary_up", domain=DOMAIN) == 0 and s
    )
    assert down, server.log()
    deferred = value(down, "backupmx_recipients_total", domain=DOMAIN, result="deferred") or 0
    server.cli("queue", "flush", "--domain", DOMAIN)
    # (A delivery claimed just before the probe's verdict may still defer its two
    # recipients without knocking; the flush's attempt knocks, which opens the pacer.)
    samples = wait_until(
        lambda: (
            (s := scrape(server))
            and (value(s, "backupmx_recipients_total", domain=DOMAIN, result="deferred") or 0)
            >= deferred + 2
            and value(s, "backupmx_host_concurrency", host="127.0.0.1") == 1
            and s
        )
    )
    assert samples, server.log()
    assert value(samples, "backupmx_primary_up", domain=DOMAIN) == 0
    connections = "backupmx_connections_total"  # the start-up wait connected once already
    earlier = value(before, connections, result="accepted") or 0
    assert value(samples, connections, result="accepted") == earlier + 1
    assert value(samples, "backupmx_messages_accepted_total") == 1
    assert value(samples, "backupmx_recipients_rejected_total", reason="denied") == 1
    assert value(samples, "backupmx_accept_latency_seconds_count") == 1
    assert value(samples, "backupmx_queue_messages") == 1
    assert value(samples, "backupmx_queue_recipients", domain=DOMAIN, state="queued") == 2
    assert value(samples, "backupmx_queue_recipients", domain=DOMAIN, state="held") == 0
    age = value(samples, "backupmx_queue_oldest_message_age_seconds", domain=DOMAIN)
    assert age is not None and 0 <= age < 60
    since = value(samples, "backupmx_primary_state_since_timestamp_seconds", domain=DOMAIN)
    assert since is not None and abs(since - time.time()) < 60
    assert value(samples, "backupmx_host_concurrency", host="127.0.0.1") == 1
    assert value(samples, "process_resident_memory_bytes")

    server.cli("queue", "hold", "--domain", DOMAIN, "--yes")
    held = scrape(server)
    assert value(held, "backupmx_queue_recipients", domain=DOMAIN, state="held") == 2
    assert value(held, "backupmx_queue_recipients", domain=DOMAIN, state="queued") == 0
    assert server.stop() == 0


def test_endpoint_answers_only_metrics_and_healthz(server_factory: Any) -> None:
    server = metered(server_factory)
    assert http(server, "/nothing")[0] == 404
    assert http(server, "/metrics", method="POST")[0] == 405
    status, body = http(server, "/healthz", method="HEAD")
    assert status == 200 and body == b""
    status, health = healthz(server)
    assert status == 200
    assert health["status"] == "ok"
    assert health["store"] == {"reachable": True, "error": None}
    assert health["listener"] == {"bound": True, "addresses": [f"{server.host}:{server.port}"]}
    assert health["process"]["pid"] == server.process.pid  # type: ignore[union-attr]
    assert server.stop() == 0


def test_metrics_port_in_use_does_not_stop_the_mail_server(server_factory: Any) -> None:
    first = metered(server_factory)
    second = server_factory(metrics=first.settings["metrics"]).start()
    with smtplib.SMTP(second.host, second.port, timeout=20) as client:
        assert client.ehlo("client.test")[0] == 250
    assert "metrics_unavailable" in second.log()
    assert second.stop() == 0 and first.stop() == 0


@pytest.mark.integration
def test_healthz_is_503_when_the_postgresql_database_is_dropped(
    server_factory: Any, postgres_url: str
) -> None:
    server = metered(server_factory, database=postgres_url)
    assert healthz(server)[0] == 200
    name = postgres_url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    status, health = healthz(server)
    assert status == 503, health
    assert health["status"] == "unavailable"
    assert health["store"]["reachable"] is False
    assert name in health["store"]["error"]  # 'database "backupmx_test_…" does not exist'
    assert health["listener"]["bound"] is True
    samples = scrape(server)
    assert value(samples, "backupmx_store_up") == 0
    assert value(samples, "backupmx_queue_messages") == 0
    assert server.process is not None and server.process.poll() is None
    server.kill()


def test_healthz_is_503_when_the_sqlite_queue_file_is_moved_away(server_factory: Any) -> None:
    server = metered(server_factory)
    assert healthz(server)[0] == 200
    queue = server.directory / "queue.db"
    queue.rename(server.directory / "queue.db.moved")
    status, health = healthz(server)
    assert status == 503
    assert health["store"] == {
        "reachable": False,
        "error": f"the queue file {queue} is missing",
    }
    assert server.process is not None and server.process.poll() is None
    Path(server.directory / "queue.db.moved").rename(queue)
    assert healthz(server)[0] == 200
    assert server.stop() == 0
