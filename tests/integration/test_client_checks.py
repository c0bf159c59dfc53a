"""Client checks: DNSBL, greylisting, per-IP rates, early talkers, the PROXY protocol.

Specification (issue "Protect"; `backupmx.receive.clients`):

* DNSBL: zones are asked when the client connects; weights of the zones that
  list it add up, and at the threshold RCPT gets ``550 5.7.1``.  A zone that does
  not answer counts as not listing (fail open) and delays nobody past
  ``dnsbl.timeout``.  Tested against a real dnsmasq (tests/support/dns_server.py) serving
  RFC 5782's test entry ``2.0.0.127.<zone>``.
* Greylisting: a new (client /24, sender, recipient) triplet gets ``450 4.7.1``;
  a retry after the delay passes, from any address of the /24; ``pass_clients``
  are never greylisted.
* Rates per client IP: messages and recipients per minute, ``450 4.7.1`` past
  them, other clients unaffected.
* Early talkers (data before the banner) are dropped with ``554 5.5.0``.
* PROXY v1/v2 only from configured balancers, required from them (``421 4.7.0``
  without), and the real client then counts everywhere (DNSBL, Received:, queue).

The pure parts (PROXY parsing, DNSBL names, the greylist key, rates, the config
keys) are in tests/unit/test_client_checks.py.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import pytest

from backupmx.config import Greylist
from backupmx.queue.database import upgrade
from backupmx.queue.records import Triplet, utcnow
from backupmx.queue.store import Store
from backupmx.receive.greylist import decide
from tests.support.dns_server import Dnsmasq, dns_zone
from tests.support.guarded import ZONE, GuardedServer, v2_header
from tests.support.server import DOMAIN, ServerProcess
from tests.support.smtp_client import RawClient, queue_id, serving, split_received

# --------------------------------------------------------------------------- the store


async def test_greylist_triplets_in_the_store_wait_pass_and_expire(database_url: str) -> None:
    store = Store.open(database_url)
    await upgrade(store.engine)
    try:
        settings = Greylist(delay=300, retry_window=2 * 86400, pass_ttl=35 * 86400)
        triplet = Triplet("192.0.2.0/24", "s@sender.test", "bob@example.test")

        async def seen(now: datetime) -> float:
            return await store.greylist(triplet, partial(decide, now=now, settings=settings))

        t0 = utcnow()
        assert await seen(t0) == 300.0
        assert await seen(t0 + timedelta(minutes=1)) == 240.0
        assert await seen(t0 + timedelta(minutes=6)) == 0.0
        later = t0 + timedelta(days=30)
        assert await seen(later) == 0.0  # still passed
        gone = later + timedelta(days=36)
        assert await seen(gone) == 300.0  # starts over
        assert await store.prune_protection(gone + timedelta(seconds=1), now=gone) == 1
    finally:
        await store.close()


# --------------------------------------------------------------------------- real servers


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    with dns_zone(tmp_path_factory.mktemp("dns"), ZONE) as server:
        yield server


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, dns: Dnsmasq) -> Iterator[ServerProcess]:
    """DNSBL zones (timeout.test never answers), PROXY from 127.0.0.9, a banner delay, rates."""
    server = GuardedServer(
        tmp_path_factory.mktemp("guarded"),
        dns={"nameservers": [dns.nameserver]},
        dnsbl={"timeout": "1s"},
        proxy_protocol=["127.0.0.9"],
        limits={
            "banner_delay": "1s",
            "max_messages_per_minute_per_ip": 3,
            "max_recipients_per_minute_per_ip": 5,
        },
    )
    with serving(server):
        yield server


def first_rcpt(server: ServerProcess, source: str) -> tuple[str, float]:
    """Connect from `source`, wait for the banner, EHLO, MAIL, one RCPT; reply and seconds."""
    started = time.monotonic()
    with RawClient(server.host, server.port, source=source) as client:
        client.command("EHLO client.test")
        client.command(f"MAIL FROM:<dnsbl-{source}@sender.test>")
        reply = client.command(f"RCPT TO:<bob@{DOMAIN}>")
    return str(reply), time.monotonic() - started


def test_dnsbl_weights_add_up_and_a_dead_zone_delays_nobody_past_its_timeout(
    guarded: ServerProcess, dns: Dnsmasq
) -> None:
    listed_reply, seconds = first_rcpt(guarded, "127.0.0.2")  # dnsbl.test 1.0 + half.test 0.5
    assert listed_reply.startswith(
        "550 5.7.1 Service unavailable; client [127.0.0.2] blocked using dnsbl.test"
    ), listed_reply
    assert seconds < 3.5  # banner delay 1 s, DNSBL timeout 1 s (timeout.test never answers)
    assert first_rcpt(guarded, "127.0.0.3")[0].startswith("250")  # half.test alone: 0.5
    assert first_rcpt(guarded, "127.0.0.4")[0].startswith("250")  # 127.255.255.254: an error
    assert first_rcpt(guarded, "127.0.0.1")[0].startswith("250")
    assert "query[A] 2.0.0.127.dnsbl.test" in dns.log.read_text()


def test_early_talker_is_dropped_and_a_patient_client_is_greeted_after_the_delay(
    guarded: ServerProcess,
) -> None:
    with socket.create_connection((guarded.host, guarded.port), timeout=10) as sock:
        sock.sendall(b"EHLO impatient.test\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert data == b"554 5.5.0 Error: SMTP protocol synchronization\r\n", data
    started = time.monotonic()
    with RawClient(guarded.host, guarded.port) as client:
        assert client.greeting.startswith("220 ")
    assert time.monotonic() - started >= 0.9


def test_per_ip_message_and_recipient_rates_answer_450_and_spare_other_clients(
    guarded: ServerProcess,
) -> None:
    with RawClient(guarded.host, guarded.port, source="127.0.0.7") as client:
        client.command("EHLO busy.test")
        assert client.command("MAIL FROM:<busy@sender.test>").code == 250
        replies = [str(client.command(f"RCPT TO:<r{n}@{DOMAIN}>")) for n in range(6)]
        assert all(r.startswith("250") for r in replies[:5]), replies
        assert replies[5].startswith("450 4.7.1 Error: too many recipients from [127.0.0.7]")
        for _ in range(2):
            assert client.command("RSET").code == 250
            assert client.command("MAIL FROM:<busy@sender.test>").code == 250
        client.command("RSET")
        refused = client.command("MAIL FROM:<busy@sender.test>")
        assert refused.startswith("450 4.7.1 Error: too much mail from [127.0.0.7]"), refused
    assert first_rcpt(guarded, "127.0.0.8")[0].startswith("250")


class Proxied(RawClient):
    """A connection from the balancer 127.0.0.9 that opens with a PROXY `header`."""

    def __init__(self, server: ServerProcess, header: bytes) -> None:
        self.timeout = 10.0
        self.sock = socket.create_connection(
            (server.host, server.port), timeout=10, source_address=("127.0.0.9", 0)
        )
        self._buffer = b""
        self.sock.sendall(header)
        self.greeting = self.reply()


def test_proxy_header_names_the_real_client_for_dnsbl_received_and_queue(
    guarded: ServerProcess,
) -> None:
    with Proxied(guarded, b"PROXY TCP4 127.0.0.2 127.0.0.1 40000 25\r\n") as client:
        assert client.greeting.startswith("220 ")
        client.command("EHLO behind.balancer.test")
        client.command("MAIL FROM:<proxied@sender.test>")
        reply = client.command(f"RCPT TO:<bob@{DOMAIN}>")
        assert reply.startswith("550 5.7.1 Service unavailable; client [127.0.0.2]"), reply
    with Proxied(guarded, v2_header("192.0.2.10")) as client:
        client.command("EHLO behind.balancer.test")
        final = client.transaction(
            "proxied@sender.test", [f"bob@{DOMAIN}"], b"Subject: via PROXY v2\r\n\r\nhi\r\n.\r\n"
        )
    qid = queue_id(final)
    received, _ = split_received(guarded.raw(qid))
    assert b"([192.0.2.10])" in received, received
    (message,) = [m for m in guarded.queue() if m["id"] == qid]
    assert message["client_ip"] == "192.0.2.10"


def test_proxy_header_is_required_from_the_balancer_and_ignored_from_anyone_else(
    guarded: ServerProcess,
) -> None:
    with Proxied(guarded, b"EHLO no.header.test\r\n") as client:
        assert client.greeting.startswith("421 4.7.0"), client.greeting
    with Proxied(guarded, v2_header(None, command=0)) as client:  # LOCAL: a health check
        assert client.greeting.startswith("220 ")
    with RawClient(guarded.host, guarded.port) as client:
        reply = client.command("PROXY TCP4 127.0.0.2 127.0.0.1 40000 25")
        assert reply.startswith("502 5.5.2"), reply
        client.command("EHLO direct.test")
        client.command("MAIL FROM:<direct@sender.test>")
        assert client.command(f"RCPT TO:<bob@{DOMAIN}>").startswith("250")


@pytest.fixture
def greylisting(server_factory: Any, dns: Dnsmasq) -> ServerProcess:
    server: ServerProcess = server_factory(
        dns={"nameservers": [dns.nameserver]},
        greylist={"enabled": True, "delay": "2s", "pass_clients": ["127.0.1.5"]},
    ).start()
    return server


def test_greylisting_defers_a_new_triplet_and_passes_its_retry_from_the_same_slash_24(
    greylisting: ServerProcess,
) -> None:
    def attempt(source: str, recipient: str = f"bob@{DOMAIN}") -> str:
        with RawClient(greylisting.host, greylisting.port, source=source) as client:
            client.command("EHLO grey.test")
            client.command("MAIL FROM:<grey@sender.test>")
            return str(client.command(f"RCPT TO:<{recipient}>"))

    first = attempt("127.0.0.1")
    assert first.startswith(f"450 4.7.1 <bob@{DOMAIN}>: Recipient address rejected: Greylisted")
    assert attempt("127.0.0.1").startswith("450 4.7.1")  # too early
    time.sleep(2.1)
    assert attempt("127.0.0.6").startswith("250 2.1.5")  # the same /24 retries: it passes
    assert attempt("127.0.0.1").startswith("250 2.1.5")  # … and stays passed
    assert attempt("127.0.0.1", f"carol@{DOMAIN}").startswith("450 4.7.1")  # a new triplet
    assert attempt("127.0.1.5", f"dave@{DOMAIN}").startswith("250 2.1.5")  # pass_clients
