"""Delivery end to end: `backupmx serve` holds mail, then hands it to real primaries.

Real programs: dnsmasq serves the MX data (`dns_server`, one pair for the
module), Postfix's smtp-sink plays the primaries and the senders' MX
(`primary_sink.SmtpSink`, one per loopback address 127.0.0.2-4, all on one
port per test, which is ``delivery.port``), and aiosmtpd stands in only where
smtp-sink cannot (refusing one recipient of a transaction).  backupmx listens
on 127.0.0.1; it is ``mx2.backup.test``, MX 20 of ``example.test``.

The state the tests wait for is read from the SQLite queue directly (a CLI call
costs a second of start-up); the contracts themselves (``queue list``,
``domains --json``, ``queue flush``, ``queue release``, ``queue show --raw``)
are checked through the real CLI.  Every wait is bounded by `wait_for`.
"""

from __future__ import annotations

import email
import email.message
import json
import re
import smtplib
import socket
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.dns_server import Dnsmasq, dns_zone
from tests.support.ports import free_port
from tests.support.primary_sink import Dumped, PickyPrimary, SlowGreeting, SmtpSink
from tests.support.server import ServerProcess
from tests.support.smtp_client import RawClient, queue_id, split_received, stored_in_parallel
from tests.support.waiting import wait_for

HOSTNAME = "mx2.backup.test"
SENDER = "alice@sender.test"
PRIMARY = "127.0.0.2"  # mx1.example.test, mxa.equal.test
SECOND_PRIMARY = "127.0.0.3"  # mxb.equal.test
SENDERS_MX = "127.0.0.4"  # mx.sender.test: where DSNs go

ZONE = """\
local=/test/
mx-host=example.test,mx1.example.test,10
mx-host=example.test,mx2.backup.test,20
host-record=mx1.example.test,127.0.0.2
host-record=mx2.backup.test,127.0.0.1
mx-host=by-address.test,mx1.example.test,10
mx-host=by-address.test,relay.backup.test,20
host-record=relay.backup.test,127.0.0.1
mx-host=only-backup.test,mx2.backup.test,10
mx-host=equal.test,mxa.equal.test,10
mx-host=equal.test,mxb.equal.test,10
host-record=mxa.equal.test,127.0.0.2
host-record=mxb.equal.test,127.0.0.3
mx-host=sender.test,mx.sender.test,10
host-record=mx.sender.test,127.0.0.4
mx-host=nullmx.test,.,0
"""

DELIVERY = {
    "probe_interval": "1s",
    "retry_min": "1s",
    "retry_max": "5s",
    "max_queue_lifetime": "5d",
    "delay_warning": "0s",
    "initial_connections_per_host": 2,
    "max_connections_per_host": 20,
    "max_messages_per_second_per_host": 50,
}
PROBE_INTERVAL = 1.0
RETRY_MAX = 5.0
FINAL = ("delivered", "bounced", "expired")
_OUR_ID = re.compile(rb"by mx2\.backup\.test \(backupmx\) with \w+ id ([0-9A-F]+)")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    with dns_zone(tmp_path_factory.mktemp("dns"), ZONE) as server:
        yield server


@pytest.fixture
def sinks() -> Iterator[Callable[..., SmtpSink]]:
    """smtp-sink factory: ``sinks(host, port, *options)`` starts one; all are removed after."""
    made: list[SmtpSink] = []

    def make(host: str, port: int, *options: str) -> SmtpSink:
        sink = SmtpSink(host, port, *options)
        made.append(sink)
        return sink.start()

    yield make
    for sink in made:
        sink.close()


@pytest.fixture
def port() -> int:
    """The primaries' port for this test (delivery.port), free on every address used."""
    for _ in range(20):
        candidate = free_port(PRIMARY)
        if all(_bindable(host, candidate) for host in ("127.0.0.1", SECOND_PRIMARY, SENDERS_MX)):
            return candidate
    raise RuntimeError("no port free on all the primaries' addresses")


def _bindable(host: str, candidate: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, candidate))
        except OSError:
            return False
    return True


def backup(
    server_factory: Any,
    dns: Dnsmasq,
    port: int,
    domains: Sequence[str | dict[str, Any]],
    **settings: Any,
) -> ServerProcess:
    """A backupmx (not started) for `domains`, resolving through dnsmasq, delivering to `port`."""
    delivery = {**DELIVERY, "port": port, **settings.pop("delivery", {})}
    server: ServerProcess = server_factory(
        hostname=HOSTNAME,
        delivery=delivery,
        dns={"nameservers": [dns.nameserver], "timeout": "2s"},
        domain=[{"name": d} if isinstance(d, str) else d for d in domains],
        **settings,
    )
    return server


# --------------------------------------------------------------------------- helpers


def query(server: ServerProcess, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    path = str(server.settings["database"]).removeprefix("sqlite:///")
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
        return db.execute(sql, params).fetchall()


def states(server: ServerProcess) -> dict[str, str]:
    """Recipient address -> state, for recipients of messages with a real sender."""
    rows = query(
        server,
        "SELECT r.address, r.state FROM recipients r JOIN messages m ON m.id = r.message_id"
        " WHERE m.sender != ''",
    )
    return dict(rows)


def recipient(server: ServerProcess, address: str) -> dict[str, Any]:
    rows = query(
        server,
        "SELECT state, attempts, last_error FROM recipients WHERE address = ?",
        address,
    )
    assert len(rows) == 1, rows
    state, attempts, last_error = rows[0]
    return {"state": state, "attempts": attempts, "last_error": last_error}


def dsn_messages(server: ServerProcess) -> list[tuple[str, str, str]]:
    """(id, recipient, state) of every DSN we queued: sender <>, sent by ourselves."""
    return query(
        server,
        "SELECT m.id, r.address, r.state FROM messages m JOIN recipients r"
        " ON m.id = r.message_id WHERE m.sender = '' AND m.protocol = 'local'",
    )


def domain_state(server: ServerProcess, name: str) -> str | None:
    rows = query(server, "SELECT state FROM domains WHERE name = ?", name)
    return str(rows[0][0]) if rows else None


def pending(server: ServerProcess) -> int:
    rows = query(
        server,
        "SELECT count(*) FROM recipients WHERE state NOT IN (?, ?, ?)",
        *FINAL,
    )
    return int(rows[0][0])


def domains_view(server: ServerProcess) -> dict[str, dict[str, Any]]:
    """`backupmx domains --json`, by domain."""
    return {d["domain"]: d for d in json.loads(server.cli("domains", "--json").stdout)}


def connections_opened(server: ServerProcess) -> int:
    return sum(1 for line in server.log().splitlines() if '"event": "connection_opened"' in line)


def content_for(tag: str, recipients: Sequence[str], sender: str = SENDER) -> bytes:
    lines = [
        f"From: <{sender}>" if sender else "From: MAILER-DAEMON@sender.test",
        f"To: {', '.join(recipients)}",
        f"Subject: delivery test {tag}",
        f"Message-ID: <{tag}@sender.test>",
        "",
        f"Body of {tag}.",
        ".a line that starts with a dot",
        "",
        f"-- end of {tag} --",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


@contextmanager
def smtp(server: ServerProcess) -> Iterator[smtplib.SMTP]:
    with smtplib.SMTP(server.host, server.port, timeout=20) as client:
        client.ehlo("client.sender.test")
        yield client


def transmit(client: smtplib.SMTP, sender: str, recipients: Sequence[str], content: bytes) -> str:
    """One transaction; returns the queue id from the 250 reply."""
    code, reply = client.mail(sender)
    assert code == 250, reply
    for address in recipients:
        code, reply = client.rcpt(address)
        assert code == 250, (address, reply)
    code, reply = client.data(content)
    assert code == 250, reply
    return queue_id(reply.decode())


def our_id(dumped: Dumped) -> str:
    """The queue id in our Received: header, the first line of what the primary got."""
    match = _OUR_ID.search(dumped.content.split(b"\n\n", 1)[0])
    assert match, dumped.content[:300]
    return match.group(1).decode()


def by_queue_id(dumps: Sequence[Dumped]) -> dict[str, list[Dumped]]:
    found: dict[str, list[Dumped]] = defaultdict(list)
    for dumped in dumps:
        found[our_id(dumped)].append(dumped)
    return dict(found)


def as_dumped(stored: bytes) -> bytes:
    """What smtp-sink writes for a stored body: LF line ends (the store has CRLF only)."""
    return stored.replace(b"\r\n", b"\n")


def delivery_reports(dumped: Dumped) -> tuple[email.message.Message, list[email.message.Message]]:
    """A DSN's top-level message and its per-recipient delivery-status fields."""
    report = email.message_from_bytes(dumped.content)
    assert report.get_content_type() == "multipart/report", report.get_content_type()
    assert report.get_param("report-type") == "delivery-status"
    parts = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    assert len(parts) == 1
    blocks = parts[0].get_payload()
    assert isinstance(blocks, list) and len(blocks) >= 2, blocks
    fields = [b for b in blocks[1:] if isinstance(b, email.message.Message)]
    assert len(fields) == len(blocks) - 1, blocks
    return report, fields


def assert_dsn_envelope(dumped: Dumped, to: str = SENDER) -> None:
    assert dumped.mail_args.split()[0] == "<>", dumped.mail_args
    assert dumped.recipients == (to,)


# --------------------------------------------------------------------------- tests


def test_held_mail_reaches_the_primary_once_with_all_recipients_when_it_comes_back(
    server_factory: Any, dns: Dnsmasq, port: int, sinks: Callable[..., SmtpSink]
) -> None:
    server = backup(server_factory, dns, port, ["example.test"]).start()
    sent: dict[str, tuple[list[str], bytes]] = {}
    with smtp(server) as client:
        for index, count in enumerate((1, 2, 3, 1, 2)):
            recipients = [f"held{index}-{k}@example.test" for k in range(count)]
            content = content_for(f"held-{index}", recipients)
            sent[transmit(client, SENDER, recipients, content)] = (recipients, content)
    total = sum(len(r) for r, _ in sent.values())

    wait_for(lambda: domain_state(server, "example.test") == "down", 10, "example.test down")
    view = domains_view(server)["example.test"]
    assert view["state"] == "down"
    assert PRIMARY in view["reason"], view
    assert view["queued"] == total, view
    listed = server.queue("--domain", "example.test")
    assert {m["id"] for m in listed} == set(sent)
    assert {r["state"] for m in listed for r in m["recipients"]} == {"queued"}
    stored = stored_in_parallel(server, list(sent))  # a delivered message's body leaves

    sink = sinks(PRIMARY, port)
    wait_for(lambda: pending(server) == 0, 20, "every held recipient delivered")
    elapsed = time.monotonic() - sink.started_at
    assert elapsed <= PROBE_INTERVAL + 2, f"delivered {elapsed:.1f} s after the primary came back"
    assert set(states(server).values()) == {"delivered"}
    assert {m["id"] for m in server.queue() if m["finished_at"]} == set(sent)
    arrived = by_queue_id(sink.messages())
    assert sorted(arrived) == sorted(sent)
    for queue, (recipients, content) in sent.items():
        (dumped,) = arrived[queue]  # once, with all its recipients
        assert dumped.sender == SENDER
        assert sorted(dumped.recipients) == sorted(recipients)
        received, body = split_received(stored[queue])
        assert body == content
        assert f"by {HOSTNAME} (backupmx)".encode() in received
        assert dumped.content == as_dumped(stored[queue])


SELF_MX_DOMAINS = ("example.test", "by-address.test", "only-backup.test")


def test_backup_never_delivers_to_itself_by_name_or_by_address(
    server_factory: Any, dns: Dnsmasq
) -> None:
    server = backup(server_factory, dns, 0, SELF_MX_DOMAINS)
    # delivery.port is our own listening port: relay.backup.test (127.0.0.1) *is* us.
    server.settings["delivery"]["port"] = server.port
    server.start()
    ids = []
    with smtp(server) as client:
        for domain in SELF_MX_DOMAINS:
            address = f"loop@{domain}"
            ids.append(transmit(client, SENDER, [address], content_for(domain, [address])))
    opened = connections_opened(server)

    wait_for(
        lambda: all(domain_state(server, d) == "down" for d in SELF_MX_DOMAINS), 10, "domains down"
    )
    time.sleep(4 * PROBE_INTERVAL)  # several probes and retries

    assert connections_opened(server) == opened, "backupmx connected to itself"
    listed = server.queue()
    assert sorted(m["id"] for m in listed) == sorted(ids), "a looped copy was queued"
    assert {r["state"] for m in listed for r in m["recipients"]} == {"queued"}
    view = domains_view(server)
    assert "no MX better than this host" in view["only-backup.test"]["reason"]
    for domain in ("example.test", "by-address.test"):
        assert view[domain]["state"] == "down"
        assert f"[{PRIMARY}]:{server.port}" in view[domain]["route"], view[domain]
        assert "127.0.0.1" not in view[domain]["route"], view[domain]
        assert "127.0.0.1" not in view[domain]["reason"], view[domain]


def test_a_4xx_is_retried_and_delivered_once_the_primary_accepts(
    server_factory: Any, dns: Dnsmasq, port: int, sinks: Callable[..., SmtpSink]
) -> None:
    deferring = sinks(PRIMARY, port, "-r", "RCPT")
    server = backup(server_factory, dns, port, ["example.test"]).start()
    recipients = ["soft1@example.test", "soft2@example.test"]
    with smtp(server) as client:
        queue = transmit(client, SENDER, recipients, content_for("soft", recipients))
    wait_for(
        lambda: all(
            recipient(server, r)["attempts"] >= 1
            and (recipient(server, r)["last_error"] or "").startswith("450")
            for r in recipients
        ),
        10,
        "a 450 from the primary",
    )
    deferring.stop()
    accepting = sinks(PRIMARY, port)
    wait_for(lambda: pending(server) == 0, RETRY_MAX + 10, "delivery after the retry")
    assert time.monotonic() - accepting.started_at <= RETRY_MAX + PROBE_INTERVAL + 2
    assert all(recipient(server, r)["state"] == "delivered" for r in recipients)
    assert all(recipient(server, r)["attempts"] >= 2 for r in recipients)
    assert deferring.count() == 0
    (dumped,) = accepting.messages()
    assert our_id(dumped) == queue
    assert sorted(dumped.recipients) == recipients


def test_a_recipient_refused_with_5xx_bounces_with_a_dsn_from_the_null_sender(
    server_factory: Any, dns: Dnsmasq, port: int, sinks: Callable[..., SmtpSink]
) -> None:
    refused = "bad@example.test"
    primary = PickyPrimary(
        PRIMARY, port, {refused: "550 5.1.1 <bad@example.test>: Recipient address rejected"}
    ).start()
    try:
        senders_mx = sinks(SENDERS_MX, port)
        server = backup(server_factory, dns, port, ["example.test"]).start()
        recipients = ["good1@example.test", refused, "good2@example.test"]
        content = content_for("picky", recipients)
        with smtp(server) as client:
            queue = transmit(client, SENDER, recipients, content)
        wait_for(lambda: pending(server) == 0 and senders_mx.count() == 1, 15, "bounce and DSN")
        received = primary.received
    finally:
        primary.stop()

    assert recipient(server, "good1@example.test")["state"] == "delivered"
    assert recipient(server, "good2@example.test")["state"] == "delivered"
    bounced = recipient(server, refused)
    assert bounced["state"] == "bounced"
    assert bounced["last_error"].startswith("550 5.1.1"), bounced
    (transaction,) = received  # the others, once, in one transaction
    assert transaction.sender == SENDER
    assert sorted(transaction.recipients) == ["good1@example.test", "good2@example.test"]
    received_header, forwarded = split_received(transaction.content)
    assert forwarded == content
    assert f"by {HOSTNAME} (backupmx)".encode() in received_header
    finished = server.cli("queue", "show", queue, "--raw", check=False)
    assert finished.returncode == 1 and "body was removed" in finished.stderr

    (dsn,) = senders_mx.messages()
    assert_dsn_envelope(dsn)
    report, (status,) = delivery_reports(dsn)
    assert report["To"].strip("<>") == SENDER
    assert status["Final-Recipient"] == f"rfc822; {refused}"
    assert status["Action"] == "failed"
    assert status["Status"] == "5.1.1"
    assert "550" in status["Diagnostic-Code"]
    assert len(dsn_messages(server)) == 1


def test_null_mx_bounces_with_a_dsn_while_nxdomain_and_servfail_keep_mail_queued(
    server_factory: Any, dns: Dnsmasq, port: int, sinks: Callable[..., SmtpSink]
) -> None:
    """All three domains are backed up here: only the null MX, the domain's own
    statement, bounces (tests/integration/test_backed_up_dns.py has the rest)."""
    senders_mx = sinks(SENDERS_MX, port)
    server = backup(
        server_factory, dns, port, ["nullmx.test", "nx.test", "servfail.invalid"]
    ).start()
    cases = {"a@nullmx.test": "5.1.10"}
    with smtp(server) as client:
        for address in [*cases, "b@nx.test", "c@servfail.invalid"]:
            transmit(client, SENDER, [address], content_for(address.split("@")[1], [address]))
        # A bounce is never bounced: the null sender gets no DSN.
        null_sender = transmit(client, "", ["d@nullmx.test"], content_for("null", ["d"], ""))
    wait_for(lambda: senders_mx.count() == 1, 15, "a DSN at the sender's MX")
    wait_for(
        lambda: {domain_state(server, d) for d in ("servfail.invalid", "nx.test")} == {"down"},
        10,
        "servfail.invalid and nx.test down",
    )

    for address in cases:
        assert recipient(server, address)["state"] == "bounced"
    assert "null MX" in recipient(server, "a@nullmx.test")["last_error"]
    # The null-sender message went in last: the DSN above says nothing of it.
    null = "SELECT state FROM recipients WHERE message_id = ?"
    wait_for(lambda: query(server, null, null_sender)[0][0] in FINAL, 10, "d@nullmx.test done")
    assert query(server, null, null_sender) == [("bounced",)]
    assert len(dsn_messages(server)) == 1  # its bounce queued none (same transaction)

    statuses = {}
    for dsn in senders_mx.messages():
        assert_dsn_envelope(dsn)
        _, (status,) = delivery_reports(dsn)
        assert status["Action"] == "failed"
        statuses[status["Final-Recipient"].removeprefix("rfc822; ")] = status["Status"]
    assert statuses == cases

    time.sleep(2 * PROBE_INTERVAL)  # SERVFAIL and NXDOMAIN are retried, never bounced
    for address, reason in [("c@servfail.invalid", "SERVFAIL"), ("b@nx.test", "NXDOMAIN")]:
        held = recipient(server, address)
        assert held["state"] == "queued", held
        # None when a probe found the domain down before the first delivery attempt.
        assert held["last_error"] is None or reason in held["last_error"], held
        view = domains_view(server)[address.split("@")[1]]
        assert view["state"] == "down" and reason in view["reason"], view
    assert senders_mx.count() == 1
    assert len(dsn_messages(server)) == 1


def test_expired_mail_gets_a_dsn_and_a_null_sender_message_gets_none(
    server_factory: Any, dns: Dnsmasq, port: int, sinks: Callable[..., SmtpSink]
) -> None:
    senders_mx = sinks(SENDERS_MX, port)
    lifetime = 3.0
    server = backup(
        server_factory, dns, port, ["example.test"], delivery={"max_queue_lifetime": "3s"}
    ).start()
    with smtp(server) as client:
        transmit(client, SENDER, ["old@example.test"], content_for("old", ["old"]))
        transmit(client, "", ["old-bounce@example.test"], content_for("oldnull", ["o"], ""))
    sent_at = time.monotonic()
    wait_for(lambda: domain_state(server, "example.test") == "down", 10, "example.test down")
    # Expiry runs in the housekeeping job: at start-up, then every minute.
    time.sleep(max(0.0, sent_at + lifetime + 0.5 - time.monotonic()))
    server.stop()
    server.start()

    wait_for(lambda: senders_mx.count() == 1, 15, "the expiry DSN at the sender's MX")
    assert recipient(server, "old@example.test")["state"] == "expired"
    assert recipient(server, "old-bounce@example.test")["state"] == "expired"
    (dsn,) = senders_mx.messages()
    assert_dsn_envelope(dsn)
    _, (status,) = delivery_reports(dsn)
    assert status["Final-Recipient"] == "rfc822; old@example.test"
    assert status["Action"] == "failed"
    assert status["Status"] == "4.4.7"
    time.sleep(PROBE_INTERVAL)
    assert [row[1] for row in dsn_messages(server)] == [SENDER]
    assert senders_mx.count() == 1


def test_a_primary_that_greets_after_40_seconds_still_gets_the_mail(
    server_factory: Any, dns: Dnsmasq, port: int, sinks: Callable[..., SmtpSink]
) -> None:
    # Past delivery.connect_timeout (30 s), within the 5 min of RFC 5321 §4.5.3.2.1.
    delay = 40.0
    sink = sinks(PRIMARY, free_port(PRIMARY))
    slow = SlowGreeting(PRIMARY, port, (sink.host, sink.port), delay).start()
    try:
        server = backup(server_factory, dns, port, ["example.test"]).start()
        with smtp(server) as client:
            queue = transmit(client, SENDER, ["late@example.test"], content_for("late", ["late"]))
        wait_for(lambda: pending(server) == 0, 3 * delay, "delivery through the late greeting")
    finally:
        slow.stop()
    assert recipient(server, "late@example.test")["state"] == "delivered"
    (dumped,) = sink.messages()
    assert our_id(dumped) == queue
    assert slow.greeted and min(slow.greeted) >= delay, slow.greeted


def test_a_primary_that_never_greets_does_not_hold_up_another_domains_probes(
    server_factory: Any, dns: Dnsmasq, port: int, sinks: Callable[..., SmtpSink]
) -> None:
    # A tarpit: the kernel completes the handshake (listen, never accept), no greeting
    # ever comes, and its probe waits the whole greeting_timeout (5 min).
    tarpit_port = free_port("127.0.0.5")
    with closing(socket.socket()) as tarpit:
        tarpit.bind(("127.0.0.5", tarpit_port))
        tarpit.listen(8)
        domains = ["example.test", {"name": "tarpit.test", "primary": [f"127.0.0.5:{tarpit_port}"]}]
        server = backup(server_factory, dns, port, domains).start()
        with smtp(server) as client:
            transmit(client, SENDER, ["held@tarpit.test"], content_for("tarpit", ["held"]))
            queue = transmit(client, SENDER, ["back@example.test"], content_for("back", ["back"]))
        wait_for(lambda: "primary_down" in server.log(), 10, "example.test's primary seen down")
        sink = sinks(PRIMARY, port)  # example.test's primary comes back
        wait_for(
            lambda: recipient(server, "back@example.test")["state"] == "delivered",
            15,
            "delivery to example.test while tarpit.test's probe waits for its greeting",
        )
        # Still waiting for the tarpit's greeting (the deliverer tried it too), never given up.
        assert recipient(server, "held@tarpit.test")["state"] in ("queued", "sending")
        stopping = time.monotonic()
        assert server.stop() == 0  # the probe still waiting is cancelled, not waited for
        assert time.monotonic() - stopping < 10
    (dumped,) = sink.messages()
    assert our_id(dumped) == queue


def test_equal_preference_mx_hosts_both_get_mail(
    server_factory: Any, dns: Dnsmasq, port: int, sinks: Callable[..., SmtpSink]
) -> None:
    first, second = sinks(PRIMARY, port), sinks(SECOND_PRIMARY, port)
    # A long probe interval: no probe re-plans the route during the batch.
    server = backup(
        server_factory, dns, port, ["equal.test"], delivery={"probe_interval": "1h"}
    ).start()
    messages = 40
    with smtp(server) as client:
        for index in range(messages):
            address = f"spread{index}@equal.test"
            transmit(client, SENDER, [address], content_for(f"spread-{index}", [address]))
    wait_for(lambda: pending(server) == 0, 30, "the batch delivered")
    counts = {PRIMARY: first.count(), SECOND_PRIMARY: second.count()}
    print(f"equal-preference split over {messages} messages: {counts}")
    assert sum(counts.values()) == messages
    assert all(counts.values()), f"one MX host of equal preference got nothing: {counts}"


def test_hold_policy_parks_5xx_from_a_primary_just_back_without_dsn_until_released(
    server_factory: Any, dns: Dnsmasq, port: int, sinks: Callable[..., SmtpSink]
) -> None:
    senders_mx = sinks(SENDERS_MX, port)
    domain = {"name": "example.test", "on_primary_5xx": "hold", "hold_window": "1h"}
    server = backup(server_factory, dns, port, [domain]).start()
    sent = {}
    with smtp(server) as client:
        for tag, recipients in (("parked1", ["p1@example.test", "p2@example.test"]),
                                ("parked2", ["p3@example.test"])):  # fmt: skip
            sent[transmit(client, SENDER, recipients, content_for(tag, recipients))] = recipients
    wait_for(lambda: domain_state(server, "example.test") == "down", 10, "example.test down")

    misconfigured = sinks(PRIMARY, port, "-f", "RCPT")
    wait_for(lambda: set(states(server).values()) == {"held"}, 10, "recipients held")
    assert all(
        recipient(server, r)["last_error"].startswith("5") for rs in sent.values() for r in rs
    )
    time.sleep(PROBE_INTERVAL)
    assert dsn_messages(server) == []
    assert senders_mx.count() == 0
    assert misconfigured.count() == 0
    assert domains_view(server)["example.test"]["held"] == 3

    misconfigured.stop()
    fixed = sinks(PRIMARY, port)
    server.cli("queue", "release", *sent)
    wait_for(lambda: pending(server) == 0, 10, "released mail delivered")
    assert set(states(server).values()) == {"delivered"}
    arrived = by_queue_id(fixed.messages())
    assert sorted(arrived) == sorted(sent)
    for queue, recipients in sent.items():
        (dumped,) = arrived[queue]
        assert sorted(dumped.recipients) == recipients
    assert senders_mx.count() == 0


def _held_with_primary_back(
    server_factory: Any,
    dns: Dnsmasq,
    port: int,
    sinks: Callable[..., SmtpSink],
    **settings: Any,
) -> tuple[ServerProcess, SmtpSink, str]:
    """Mail held for a down primary that has just come back, with probes an hour apart."""
    server = backup(
        server_factory, dns, port, ["example.test"], delivery={"probe_interval": "1h"}, **settings
    ).start()
    with smtp(server) as client:
        queue = transmit(client, SENDER, ["wait@example.test"], content_for("wait", ["wait"]))
    wait_for(lambda: domain_state(server, "example.test") == "down", 10, "example.test down")
    sink = sinks(PRIMARY, port)
    time.sleep(1.5)
    assert recipient(server, "wait@example.test")["state"] == "queued", "no probe should run"
    return server, sink, queue


def test_queue_flush_domain_sends_held_mail_at_once_despite_a_long_probe_interval(
    server_factory: Any, dns: Dnsmasq, port: int, sinks: Callable[..., SmtpSink]
) -> None:
    server, sink, queue = _held_with_primary_back(server_factory, dns, port, sinks)
    server.cli("queue", "flush", "--domain", "example.test")
    flushed = time.monotonic()
    wait_for(lambda: pending(server) == 0, 10, "delivery after the flush")
    assert time.monotonic() - flushed <= 2.0
    (dumped,) = sink.messages()
    assert our_id(dumped) == queue


def test_etrn_sends_held_mail_at_once_despite_a_long_probe_interval(
    server_factory: Any, dns: Dnsmasq, port: int, sinks: Callable[..., SmtpSink]
) -> None:
    server, sink, queue = _held_with_primary_back(
        server_factory, dns, port, sinks, etrn_clients=["127.0.0.1"]
    )
    with RawClient(server.host, server.port) as client:
        assert client.command("EHLO mx1.example.test").code == 250
        reply = client.command("ETRN example.test")
        asked = time.monotonic()
        assert reply.code == 250, reply
        client.command("QUIT")
    wait_for(lambda: pending(server) == 0, 10, "delivery after ETRN")
    assert time.monotonic() - asked <= 2.0
    (dumped,) = sink.messages()
    assert our_id(dumped) == queue


def test_kill_9_during_a_flush_then_restart_delivers_every_recipient(
    server_factory: Any, dns: Dnsmasq, port: int, sinks: Callable[..., SmtpSink]
) -> None:
    server = backup(server_factory, dns, port, ["example.test"]).start()
    messages, threads = 300, 3
    sent: dict[str, list[str]] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(share: range) -> None:
        try:
            with smtp(server) as session:
                for index in share:
                    recipients = [f"k{index}-a@example.test", f"k{index}-b@example.test"]
                    queue = transmit(session, SENDER, recipients, content_for(f"k{index}", []))
                    with lock:
                        sent[queue] = recipients
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    workers = [
        threading.Thread(target=client, args=(range(n, messages, threads),)) for n in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert not errors and len(sent) == messages, errors
    wait_for(lambda: domain_state(server, "example.test") == "down", 10, "example.test down")

    sink = sinks(PRIMARY, port)
    wait_for(lambda: sink.count() >= messages // 3, 30, "a third of the flush", interval=0.02)
    server.kill()
    at_kill = sink.count()
    server.start()
    wait_for(lambda: pending(server) == 0, 60, "every recipient after the restart")

    assert set(states(server).values()) == {"delivered"}
    copies = by_queue_id(sink.messages())
    assert sorted(copies) == sorted(sent), "a message never reached the primary"
    for queue, recipients in sent.items():
        got = Counter(r for dumped in copies[queue] for r in dumped.recipients)
        assert set(got) == set(recipients), (queue, got)
    duplicates = {q: len(c) for q, c in copies.items() if len(c) > 1}
    print(
        f"kill -9 after {at_kill} of {messages} messages: "
        f"{len(duplicates)} delivered twice or more {sorted(duplicates.values())}"
    )


def peak_rss(pid: int) -> int:
    """The process's peak resident size since the last `reset_peak_rss`, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    (kib,) = re.findall(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(kib) * 1024


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux 4.0+)


LARGE_MESSAGES, LARGE_SIZE = 40, 4 * 1024 * 1024


def test_a_flush_of_large_messages_holds_a_few_bodies_in_memory_not_every_claimed_one(
    server_factory: Any, dns: Dnsmasq, port: int, sinks: Callable[..., SmtpSink]
) -> None:
    """40 held messages of 4 MiB, one claim: serve read all 160 MiB of bodies with the
    claim; now a large body is read only when it is sent, 16 MiB of them at most."""
    server = backup(server_factory, dns, port, ["example.test"]).start()
    line = b"x" * 998 + b"\r\n"
    sent = {}
    with smtp(server) as client:
        for index in range(LARGE_MESSAGES):
            content = content_for(f"large-{index}", []) + line * (LARGE_SIZE // len(line))
            sent[transmit(client, SENDER, [f"large{index}@example.test"], content)] = content
    wait_for(lambda: domain_state(server, "example.test") == "down", 10, "example.test down")
    assert server.process is not None
    pid = server.process.pid
    reset_peak_rss(pid)
    before = peak_rss(pid)

    sink = sinks(PRIMARY, port)
    wait_for(lambda: pending(server) == 0, 120, "every large message delivered")
    grown = peak_rss(pid) - before
    total = LARGE_MESSAGES * LARGE_SIZE
    print(f"\nserve's peak grew by {grown / 2**20:.0f} MiB for {total / 2**20:.0f} MiB of bodies")
    assert sorted(by_queue_id(sink.messages())) == sorted(sent)
    assert grown < total // 2, f"{grown / 2**20:.0f} MiB for {total / 2**20:.0f} MiB of bodies"
