"""Metrics and health: a real `backupmx serve`, scraped over HTTP and parsed with prometheus_client.

The tests send real mail (smtplib) to a server whose primary
(127.0.0.1:9) refuses connections, then read ``/metrics`` with
``prometheus_client.parser`` and ``/healthz`` as JSON: counters for what
happened, gauges for what the queue holds and the disk it takes (on SQLite and
on PostgreSQL), ``503`` once the queue database is gone (a PostgreSQL database
dropped under the server, an SQLite file moved away) while the process keeps
running.  The pure parts (reply reasons, domain labels, the queue summary, a
scrape of a store that does not answer) are in tests/unit/test_metrics.py.
"""

from __future__ import annotations

import json
import os
import smtplib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from tests.support.ports import free_port
from tests.support.server import DOMAIN, POSTGRES_ADMIN_URL, ServerProcess
from tests.support.waiting import port_open, wait_for

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


def scrape_if(server: ServerProcess, condition: Callable[[Samples], bool]) -> Samples | None:
    """A scrape whose samples meet `condition`, or None: a check for `wait_for`."""
    samples = scrape(server)
    return samples if condition(samples) else None


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
    wait_for(lambda: port_open("127.0.0.1", port), 15, f"the metrics endpoint on port {port}")
    return server


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
    down = wait_for(
        lambda: scrape_if(server, lambda s: value(s, "backupmx_primary_up", domain=DOMAIN) == 0),
        15.0,
        f"backupmx_primary_up{{domain={DOMAIN}}} to be 0",
        interval=0.2,
    )
    deferred = value(down, "backupmx_recipients_total", domain=DOMAIN, result="deferred") or 0
    server.cli("queue", "flush", "--domain", DOMAIN)
    # (A delivery claimed just before the probe's verdict may still defer its two
    # recipients without knocking; the flush's attempt knocks, which opens the pacer.)
    samples = wait_for(
        lambda: scrape_if(
            server,
            lambda s: (
                (value(s, "backupmx_recipients_total", domain=DOMAIN, result="deferred") or 0)
                >= deferred + 2
                and value(s, "backupmx_host_concurrency", host="127.0.0.1") == 1
                # The flush resets the domain's state (retry_down) until its attempt fails.
                and value(s, "backupmx_primary_up", domain=DOMAIN) == 0
            ),
        ),
        15.0,
        "two more deferred recipients after the flush, a host concurrency of 1, primary down",
        interval=0.2,
    )
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


def test_scrape_shows_the_sqlite_queue_size_and_the_free_space_beside_it(
    server_factory: Any,
) -> None:
    server = metered(server_factory)
    samples = scrape(server)
    files = [server.directory / "queue.db", server.directory / "queue.db-wal"]
    on_disk = sum(f.stat().st_size for f in files if f.exists())
    size = value(samples, "backupmx_queue_database_bytes")
    assert size is not None and abs(size - on_disk) < 1024**2  # an idle, nearly empty queue
    disk = os.statvfs(server.directory)
    free = value(samples, "backupmx_queue_filesystem_free_bytes")
    assert free is not None and 0 < free <= disk.f_blocks * disk.f_frsize
    assert server.stop() == 0


def test_scrape_shows_the_postgresql_database_size_and_no_free_space(
    server_factory: Any, postgres_url: str
) -> None:
    server = metered(server_factory, database=postgres_url)
    samples = scrape(server)
    size = value(samples, "backupmx_queue_database_bytes")
    assert size is not None and size > 1024**2  # an empty PostgreSQL database takes megabytes
    assert value(samples, "backupmx_queue_filesystem_free_bytes") is None
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


def test_a_metrics_port_in_use_stops_serve_with_one_line_naming_metrics_listen(
    server_factory: Any,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        server = server_factory(metrics={"listen": address})
        server.write_config()
        result = subprocess.run(
            [sys.executable, "-m", "backupmx", "--config", str(server.config_path), "serve"],
            capture_output=True, text=True, timeout=60, cwd=server.directory,
        )  # fmt: skip
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert "metrics.listen" in line and address in line and "Traceback" not in result.stderr


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
