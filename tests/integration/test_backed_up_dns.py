"""A backed-up domain whose DNS fails: `backupmx serve` holds its mail, and says why.

Specification (issue 13): for a domain this server is configured to back up, an
MX lookup that answers NXDOMAIN or SERVFAIL (or nothing) holds the mail —
recipients stay queued through delivery attempts and probes, the domain is down
with the DNS reason in ``backupmx domains --json`` (``dns_failing``) and
``backupmx_domain_dns_failing`` is 1 on the metrics endpoint — and only
``max_queue_lifetime`` ends it.  A null MX (RFC 7505) of a backed-up domain still
bounces, and so does the NXDOMAIN of a domain that is not backed up (the DSN to
a sender whose domain does not exist fails for good).

Real programs: dnsmasq (`dns_server`: ``*.test`` names it does not know are
NXDOMAIN, ``servfail.invalid`` is SERVFAIL), a real ``backupmx serve`` and its
CLI, the metrics endpoint over HTTP.  Every wait is bounded by `wait_for`.
"""

from __future__ import annotations

import json
import smtplib
import sqlite3
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.dns_server import Dnsmasq, dns_zone
from tests.support.ports import free_port
from tests.support.server import ServerProcess
from tests.support.waiting import port_open, wait_for

ZONE = """\
local=/test/
mx-host=nullmx.test,.,0
"""
SENDER = "alice@gone-sender.test"  # NXDOMAIN, and not backed up here
HELD = ["a@nx.test", "b@servfail.invalid"]
# Long enough for the deliverer (which polls every second) to try the mail before a
# probe marks its domain down, short enough for probes to run during the test.
PROBE_INTERVAL = 4.0


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    with dns_zone(tmp_path_factory.mktemp("dns"), ZONE) as server:
        yield server


def backup(server_factory: Any, dns: Dnsmasq, **delivery: Any) -> ServerProcess:
    """backupmx for nx.test, servfail.invalid and nullmx.test, resolving through dnsmasq."""
    metrics = free_port()
    server: ServerProcess = server_factory(
        dns={"nameservers": [dns.nameserver], "timeout": "2s"},
        domain=[{"name": d} for d in ("nx.test", "servfail.invalid", "nullmx.test")],
        delivery={
            "probe_interval": f"{PROBE_INTERVAL:g}s",
            "retry_min": "1s",
            "retry_max": "2s",
            "port": free_port(),
            **delivery,
        },
        metrics={"listen": f"127.0.0.1:{metrics}", "store_timeout": "3s"},
    ).start()
    wait_for(lambda: port_open("127.0.0.1", metrics), 15, "the metrics endpoint")
    return server


def send(server: ServerProcess, recipient: str) -> None:
    with smtplib.SMTP(server.host, server.port, timeout=20) as client:
        client.ehlo("client.sender.test")
        client.sendmail(SENDER, [recipient], f"From: <{SENDER}>\r\nSubject: t\r\n\r\nbody\r\n")


def recipient(server: ServerProcess, address: str) -> tuple[str, int, str | None]:
    """(state, attempts, last_error), read from the SQLite queue."""
    path = str(server.settings["database"]).removeprefix("sqlite:///")
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
        rows = db.execute(
            "SELECT state, attempts, last_error FROM recipients WHERE address = ?", (address,)
        ).fetchall()
    assert len(rows) == 1, rows
    return rows[0]


def domains_view(server: ServerProcess) -> dict[str, dict[str, Any]]:
    return {d["domain"]: d for d in json.loads(server.cli("domains", "--json").stdout)}


def dns_failing_gauge(server: ServerProcess) -> dict[str, float]:
    url = f"http://{server.settings['metrics']['listen']}/metrics"
    with urllib.request.urlopen(url, timeout=15) as response:
        text = response.read().decode()
    return {
        sample.labels["domain"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "backupmx_domain_dns_failing"
        for sample in family.samples
    }


def test_nxdomain_and_servfail_of_a_backed_up_domain_hold_its_mail_and_say_why(
    server_factory: Any, dns: Dnsmasq
) -> None:
    server = backup(server_factory, dns)
    for address in HELD:
        send(server, address)

    def both_down() -> bool:
        view = domains_view(server)
        return all(view.get(a.split("@")[1], {}).get("state") == "down" for a in HELD)

    wait_for(both_down, 15, "nx.test and servfail.invalid down")
    # A flush has the deliverer try every domain again; probes run meanwhile.
    for _ in range(3):
        server.cli("queue", "flush", "--all")
        time.sleep(1.5)

    def probed() -> bool:
        view = domains_view(server)
        return all(
            str(view[a.split("@")[1]]["last_probe_result"]).startswith("DNS: ") for a in HELD
        )

    wait_for(probed, 3 * PROBE_INTERVAL, "a probe of each domain")
    for address in HELD:
        state, attempts, last_error = recipient(server, address)
        assert state == "queued", (address, state, last_error)
        assert attempts >= 1 and last_error is not None and last_error.startswith("DNS: ")

    view = domains_view(server)
    nx = view["nx.test"]
    assert nx["reason"] == "DNS: MX lookup of nx.test: no such domain (NXDOMAIN)", nx
    assert nx["dns_failing"] is True and nx["state"] == "down"
    servfail = view["servfail.invalid"]
    assert "SERVFAIL" in servfail["reason"] and servfail["dns_failing"] is True, servfail
    assert "NXDOMAIN" in server.cli("domains").stdout
    gauge = wait_for(
        lambda: (g := dns_failing_gauge(server)).get("nx.test") == 1 and g, 10, "the metric"
    )
    assert gauge["servfail.invalid"] == 1
    assert '"event": "recipient_bounced"' not in server.log()


def test_null_mx_still_bounces_and_a_dsn_to_a_domain_that_does_not_exist_fails(
    server_factory: Any, dns: Dnsmasq
) -> None:
    server = backup(server_factory, dns)
    send(server, "c@nullmx.test")
    wait_for(lambda: recipient(server, "c@nullmx.test")[0] == "bounced", 15, "the null MX bounce")
    assert "null MX" in str(recipient(server, "c@nullmx.test")[2])
    # The DSN to alice@gone-sender.test: NXDOMAIN, not backed up, fails for good.
    wait_for(lambda: recipient(server, SENDER)[0] == "bounced", 15, "the DSN given up")
    assert "NXDOMAIN" in str(recipient(server, SENDER)[2])
    assert domains_view(server)["nullmx.test"]["dns_failing"] is False
    assert dns_failing_gauge(server).get("nullmx.test") == 0


def test_only_max_queue_lifetime_ends_the_mail_of_a_domain_whose_dns_fails(
    server_factory: Any, dns: Dnsmasq
) -> None:
    lifetime = 3.0
    server = backup(server_factory, dns, max_queue_lifetime="3s")
    send(server, "d@nx.test")
    sent_at = time.monotonic()
    wait_for(lambda: domains_view(server)["nx.test"]["state"] == "down", 10, "nx.test down")
    assert recipient(server, "d@nx.test")[0] == "queued"
    # Expiry runs in the housekeeping job: at start-up, then every minute.
    time.sleep(max(0.0, sent_at + lifetime + 0.5 - time.monotonic()))
    server.stop()
    server.start()
    wait_for(lambda: recipient(server, "d@nx.test")[0] == "expired", 15, "d@nx.test expired")
