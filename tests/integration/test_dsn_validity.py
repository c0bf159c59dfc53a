"""Every DSN a real ``backupmx serve`` sends is accepted by a strict receiver.

A real ``backupmx serve`` delivers to an aiosmtpd primary that refuses, defers
and takes recipients (mx1.example.test from dnsmasq), and the DSNs it queues go
to `StrictSink` receivers (the senders' MX, and the address literal
``[127.0.0.1]``), which refuse 8-bit content without BODY=8BITMIME and UTF-8
envelopes or headers without SMTPUTF8.  Every DSN must be accepted, and pass the
strict check (tests/support/dsn_check.py, `check_dsn`): envelope, MIME types,
address types, lines, size, each DSN parsed back with Python's `email` package
(policy SMTPUTF8), as a recipient's mail reader would.  The same check of DSNs
built directly, without a server, is in tests/unit/test_dsn_validity.py.
"""

from __future__ import annotations

import email
import smtplib
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import pytest

from backupmx.bounce.dsn import RETURN_SIZE_LIMIT
from tests.support.dns_server import Dnsmasq, dns_zone
from tests.support.dsn_check import (
    EIGHT_BIT,
    HOSTNAME,
    LONG_BODY_LINE,
    LONG_HEADERS,
    UTF8,
    Expected,
    check_dsn,
    raw_parts,
    reported_actions,
    status_blocks,
)
from tests.support.ports import free_port
from tests.support.primary_sink import PickyPrimary, StrictSink, Transaction
from tests.support.server import ServerProcess
from tests.support.waiting import wait_for

# --------------------------------------------------------------------------- the strict sink


def test_the_strict_sink_refuses_what_a_strict_receiver_would() -> None:
    port = free_port()
    sink = StrictSink("127.0.0.1", port).start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("client.test")
            client.mail("")
            client.rcpt("alice@sender.test")
            code, _ = client.data(b"Subject: x\r\n\r\n\xc3\xa9\r\n")  # no BODY=8BITMIME
            assert code == 554
            client.rset()
            client.mail("", ["BODY=8BITMIME"])
            client.rcpt("alice@sender.test")
            code, _ = client.data(b"Subject: \xc3\xa9\r\n\r\nx\r\n")  # no SMTPUTF8
            assert code == 554
            client.rset()
            client.mail("", ["BODY=8BITMIME"])
            client.rcpt("alice@sender.test")
            code, _ = client.data(b"Subject: x\r\n\r\n" + b"z" * 999 + b"\r\n")
            assert code == 554
            client.rset()
            client.mail("", ["BODY=8BITMIME", "SMTPUTF8"])
            client.rcpt("jürgen@sender.test")
            code, _ = client.data(b"To: j\xc3\xbcrgen@sender.test\r\n\r\n\xc3\xa9\r\n")
            assert code == 250
    finally:
        sink.stop()
    assert len(sink.refused) == 3 and len(sink.received) == 1


# --------------------------------------------------------------------------- backupmx serve

PRIMARY = "127.0.0.2"  # mx1.example.test
SENDERS_MX = "127.0.0.4"  # mx.sender.test
LITERAL = "127.0.0.1"  # user@[127.0.0.1]
ZONE = """\
local=/test/
mx-host=example.test,mx1.example.test,10
mx-host=example.test,mx2.backup.test,20
host-record=mx1.example.test,127.0.0.2
host-record=mx2.backup.test,127.0.0.1
mx-host=sender.test,mx.sender.test,10
host-record=mx.sender.test,127.0.0.4
"""
NOTIFY_ALL = "NOTIFY=SUCCESS,FAILURE,DELAY"
WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class Sent:
    envid: str
    sender: str
    options: tuple[str, ...]
    recipients: dict[str, str]  # address -> the action its DSN reports
    content: bytes

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.options

    @property
    def full(self) -> bool:
        return "RET=FULL" in self.options and len(self.content) <= RETURN_SIZE_LIMIT


def trio(bad: str, late: str, good: str) -> dict[str, str]:
    return {bad: "failed", late: "delayed", good: "relayed"}


ASCII_TRIO = trio("bad@example.test", "late@example.test", "good@example.test")
UTF8_TRIO = trio("bäd@example.test", "läte@example.test", "güt@example.test")
UTF8_OPTIONS = ("SMTPUTF8", "BODY=8BITMIME")
ALICE, JURGEN = "alice@sender.test", "jürgen@sender.test"
BAD = {"bad@example.test": "failed"}
MESSAGES = [
    Sent("8bit-full", ALICE, ("BODY=8BITMIME", "RET=FULL"), ASCII_TRIO, EIGHT_BIT),
    Sent("8bit-hdrs", ALICE, ("BODY=8BITMIME", "RET=HDRS"), ASCII_TRIO, EIGHT_BIT),
    Sent("utf8-full", ALICE, (*UTF8_OPTIONS, "RET=FULL"), UTF8_TRIO, UTF8),
    Sent("utf8-hdrs", ALICE, (*UTF8_OPTIONS, "RET=HDRS"), UTF8_TRIO, UTF8),
    Sent("sender-full", JURGEN, (*UTF8_OPTIONS, "RET=FULL"), ASCII_TRIO, UTF8),
    Sent("sender-hdrs", JURGEN, (*UTF8_OPTIONS, "RET=HDRS"), UTF8_TRIO, UTF8),
    Sent("literal", f"user@[{LITERAL}]", ("BODY=8BITMIME", "RET=FULL"), BAD, EIGHT_BIT),
    Sent("long-hdrs", ALICE, ("RET=HDRS",), BAD, LONG_HEADERS),
    Sent("long-full", ALICE, ("RET=FULL",), BAD, LONG_HEADERS),
    Sent("long-body", ALICE, ("RET=FULL",), BAD, LONG_BODY_LINE),
]


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    with dns_zone(tmp_path_factory.mktemp("dns"), ZONE) as server:
        yield server


def a_port() -> int:
    """One port free on every loopback address the test listens on (delivery.port)."""
    for _ in range(20):
        candidate = free_port(PRIMARY)
        try:
            for host in (SENDERS_MX, LITERAL):
                with socket.socket() as sock:
                    sock.bind((host, candidate))
        except OSError:
            continue
        return candidate
    raise RuntimeError("no port free on all the addresses")


def pending_late(server: ServerProcess) -> int:
    path = str(server.settings["database"]).removeprefix("sqlite:///")
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
        rows = db.execute(
            "SELECT count(*) FROM recipients WHERE attempts > 0 AND state = 'queued'"
        ).fetchall()
    return int(rows[0][0])


def status_of(content: bytes) -> bytes:
    """The body of a DSN's second part, the delivery status."""
    boundary = email.message_from_bytes(content).get_boundary()
    assert boundary is not None
    return raw_parts(content, boundary)[1][1]


def envid_of(transaction: Transaction) -> str:
    return str(status_blocks(status_of(transaction.content))[0]["Original-Envelope-Id"])


def test_every_dsn_backupmx_sends_is_accepted_by_a_strict_receiver(
    server_factory: Any, dns: Dnsmasq
) -> None:
    port = a_port()
    refuse = {}
    for sent in MESSAGES:
        for address, action in sent.recipients.items():
            if action == "failed":
                refuse[address] = "550 5.1.1 no such user"
            elif action == "delayed":
                refuse[address] = "450 4.2.0 try again later"
    primary = PickyPrimary(PRIMARY, port, refuse, smtputf8=True).start()
    senders_mx = StrictSink(SENDERS_MX, port).start()
    literal = StrictSink(LITERAL, port).start()
    try:
        server: ServerProcess = server_factory(
            hostname=HOSTNAME,
            delivery={
                "port": port,
                "probe_interval": "1s",
                # Not retried before the restart below: housekeeping must find the late
                # recipients queued, not in the middle of another attempt.
                "retry_min": "60s",
                "retry_max": "60s",
                "delay_warning": "1s",
            },
            dns={"nameservers": [dns.nameserver], "timeout": "2s"},
            domain=[{"name": "example.test"}],
        ).start()
        with smtplib.SMTP(server.host, server.port, timeout=30) as client:
            client.ehlo("client.sender.test")
            for sent in MESSAGES:
                code, reply = client.mail(sent.sender, [*sent.options, f"ENVID={sent.envid}"])
                assert code == 250, reply
                for address in sent.recipients:
                    code, reply = client.rcpt(address, [NOTIFY_ALL])
                    assert code == 250, (address, reply)
                code, reply = client.data(sent.content)
                assert code == 250, (sent.envid, reply)
        immediate = sum(1 for s in MESSAGES for a in s.recipients.values() if a != "delayed")
        delayed = sum(1 for s in MESSAGES for a in s.recipients.values() if a == "delayed")
        wait_for(
            lambda: len(senders_mx.received) + len(literal.received) >= immediate,
            WAIT_SECONDS,
            "the failure and success DSNs",
            interval=0.2,
        )
        wait_for(
            lambda: pending_late(server) >= delayed,
            WAIT_SECONDS,
            "a 450 for each late",
            interval=0.2,
        )
        # Delay warnings are queued by housekeeping, which runs at start-up.
        server.stop()
        server.start()
        wait_for(
            lambda: len(senders_mx.received) + len(literal.received) >= immediate + delayed,
            WAIT_SECONDS,
            "the delay DSNs",
            interval=0.2,
        )
        time.sleep(1)  # nothing more may come
        server.stop()
    finally:
        primary.stop()
        senders_mx.stop()
        literal.stop()

    assert senders_mx.refused == [] and literal.refused == []
    assert len(senders_mx.received) + len(literal.received) == immediate + delayed
    by_envid: dict[str, list[Transaction]] = {}
    for transaction in senders_mx.received + literal.received:
        by_envid.setdefault(envid_of(transaction), []).append(transaction)
    assert sorted(by_envid) == sorted(s.envid for s in MESSAGES)
    assert [t.sender for t in literal.received] == ["<>"]  # aiosmtpd keeps the brackets
    assert literal.received[0].recipients == [f"user@[{LITERAL}]"]
    for sent in MESSAGES:
        reported: dict[str, str] = {}
        for transaction in by_envid[sent.envid]:
            assert transaction.sender == "<>"
            assert transaction.recipients == [sent.sender]
            actions = reported_actions(status_blocks(status_of(transaction.content)))
            (action,) = set(actions.values())  # one DSN per kind
            checked = check_dsn(
                transaction.content,
                transaction.mail_options,
                Expected(
                    sent.sender,
                    actions,
                    smtputf8_original=sent.smtputf8,
                    full=sent.full and action == "failed",
                ),
            )
            reported.update(actions)
            text = " ".join(checked.notification.split())
            if sent.envid.startswith("long"):
                assert "are cut short in the attached copy" in text
            if sent.content is LONG_HEADERS:
                assert "only their first 64 KiB are attached" in text
        assert reported == sent.recipients, sent.envid
