"""Crash safety: SIGKILL `backupmx serve` under load, restart it, lose nothing that was acked.

Ten smtplib clients send a few thousand messages over persistent connections
and record, client-side, every queue id from ``250 2.0.0 Ok: queued as ID``.
Part-way through another thread SIGKILLs the server; the clients fail; the
server is started again on the same configuration and SQLite file.  Every
message a client saw ``250`` for must then be in the queue with all its
recipients and the body it was sent (invariant 1 of docs/queue.md#invariants),
and the SQLite file must pass ``PRAGMA integrity_check``.
"""

from __future__ import annotations

import hashlib
import re
import smtplib
import sqlite3
import threading
import time
from dataclasses import dataclass, field

from tests.support.server import DOMAIN, ServerProcess

MESSAGES = 3000
CLIENTS = 10
KILL_AFTER_ACKS = 1500
LOAD_SECONDS = 60.0  # upper bound on the sending phase, kill included
QUEUED = re.compile(r"2\.0\.0 Ok: queued as ([0-9A-F]+)")


@dataclass(frozen=True)
class Sent:
    index: int
    recipients: tuple[str, ...]
    body: bytes


@dataclass
class Ledger:
    """What the clients saw; shared by the client threads under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[str, Sent] = field(default_factory=dict)  # queue id -> message
    attempted: dict[int, Sent] = field(default_factory=dict)  # DATA begun, by index
    failures_before_kill: list[str] = field(default_factory=list)


def message(index: int) -> Sent:
    """A unique message: 1–3 recipients and a body of varied size with its index inside."""
    recipients = tuple(f"rcpt{index}-{k}@{DOMAIN}" for k in range(index % 3 + 1))
    lines = [
        f"From: load{index}@sender.test",
        f"To: {', '.join(recipients)}",
        f"Subject: crash safety {index}",
        f"Message-ID: <crash-{index}@sender.test>",
        "",
        *(f"line {n} of message {index} " + "x" * (index % 61) for n in range(index % 40 + 1)),
    ]
    return Sent(index, recipients, ("\r\n".join(lines) + "\r\n").encode())


def body_after_received(raw: bytes) -> bytes:
    """The stored message without our first (possibly folded) Received: header."""
    assert raw.startswith(b"Received: "), raw[:80]
    end = 0
    while True:
        end = raw.index(b"\r\n", end) + 2
        if raw[end : end + 1] not in (b" ", b"\t"):
            return raw[end:]


def run_client(
    server: ServerProcess,
    share: range,
    ledger: Ledger,
    killed: threading.Event,
    deadline: float,
) -> None:
    try:
        with smtplib.SMTP(server.host, server.port, timeout=20) as client:
            client.ehlo(f"client{share.start}.test")
            for index in share:
                if time.monotonic() > deadline:
                    return
                sent = message(index)
                code, reply = client.mail(f"load{index}@sender.test")
                if code != 250:
                    raise AssertionError(f"MAIL answered {code} {reply!r}")
                for address in sent.recipients:
                    code, reply = client.rcpt(address)
                    if code != 250:
                        raise AssertionError(f"RCPT answered {code} {reply!r}")
                with ledger.lock:
                    ledger.attempted[index] = sent
                code, reply = client.data(sent.body)
                text = reply.decode()
                match = QUEUED.search(text)
                if code != 250 or match is None:
                    raise AssertionError(f"DATA answered {code} {text!r}")
                with ledger.lock:
                    ledger.acked[match.group(1)] = sent
    except (OSError, smtplib.SMTPException, AssertionError) as error:
        if not killed.is_set():
            with ledger.lock:
                ledger.failures_before_kill.append(f"{type(error).__name__}: {error}")


def kill_part_way(
    server: ServerProcess, ledger: Ledger, killed: threading.Event, deadline: float
) -> None:
    while time.monotonic() < deadline:
        with ledger.lock:
            if len(ledger.acked) >= KILL_AFTER_ACKS:
                break
        time.sleep(0.005)
    killed.set()
    server.kill()


def stored_bodies(database: str, ids: list[str]) -> dict[str, tuple[bytes, str]]:
    """Read bodies straight from the SQLite file: id -> (body, stored sha256)."""
    found: dict[str, tuple[bytes, str]] = {}
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for queue_id, body, sha in conn.execute(
                f"SELECT id, body, sha256 FROM messages JOIN bodies ON message_id = id"
                f" WHERE id IN ({marks})",
                chunk,
            ):
                found[queue_id] = (bytes(body), sha)
    return found


def test_sigkill_under_load_loses_no_acked_message(server: ServerProcess) -> None:
    database = server.settings["database"].removeprefix("sqlite:///")
    ledger = Ledger()
    killed = threading.Event()
    started = time.monotonic()
    deadline = started + LOAD_SECONDS
    clients = [
        threading.Thread(
            target=run_client,
            args=(server, range(n, MESSAGES, CLIENTS), ledger, killed, deadline),
            daemon=True,
        )
        for n in range(CLIENTS)
    ]
    killer = threading.Thread(
        target=kill_part_way, args=(server, ledger, killed, deadline), daemon=True
    )
    for thread in [*clients, killer]:
        thread.start()
    killer.join(LOAD_SECONDS + 5)
    for thread in clients:
        thread.join(30)
    assert not killer.is_alive() and not any(t.is_alive() for t in clients)
    assert ledger.failures_before_kill == []
    assert len(ledger.acked) >= KILL_AFTER_ACKS, "the server was killed before enough acks"
    load_seconds = time.monotonic() - started

    server.start()
    listed = {m["id"]: m for m in server.queue()}
    bodies = stored_bodies(database, list(listed))

    missing = sorted(set(ledger.acked) - set(listed))
    assert missing == [], f"{len(missing)} acked messages lost, e.g. {missing[:5]}"
    for queue_id, sent in ledger.acked.items():
        entry = listed[queue_id]
        assert sorted(r["address"] for r in entry["recipients"]) == sorted(sent.recipients)
        body, sha = bodies[queue_id]
        assert hashlib.sha256(body).hexdigest() == sha == entry["sha256"]
        assert entry["size"] == len(body)
        assert body_after_received(body) == sent.body, queue_id

    # What was stored but not acked (committed, then killed before the 250 got
    # out) must still be a message some client sent, whole.
    by_body = {sent.body: sent for sent in ledger.attempted.values()}
    unacked = sorted(set(listed) - set(ledger.acked))
    for queue_id in unacked:
        origin = by_body.get(body_after_received(bodies[queue_id][0]))
        assert origin is not None, f"{queue_id} holds a body no client sent"
        recipients = sorted(r["address"] for r in listed[queue_id]["recipients"])
        assert recipients == sorted(origin.recipients)

    for queue_id in list(ledger.acked)[:: max(len(ledger.acked) // 10, 1)][:10]:
        raw = server.raw(queue_id)
        assert hashlib.sha256(raw).hexdigest() == listed[queue_id]["sha256"]
        assert body_after_received(raw) == ledger.acked[queue_id].body

    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]

    with smtplib.SMTP(server.host, server.port, timeout=20) as client:
        refused = client.sendmail(
            "after@sender.test", [f"after@{DOMAIN}"], b"Subject: x\r\n\r\nx\r\n"
        )
    assert refused == {}

    print(
        f"\ncrash safety: sent-with-DATA={len(ledger.attempted)} acked={len(ledger.acked)} "
        f"stored={len(listed)} stored-but-not-acked={len(unacked)} "
        f"load+kill {load_seconds:.1f}s"
    )
