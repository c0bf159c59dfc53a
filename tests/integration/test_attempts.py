"""The attempt history: each delivery attempt of a recipient, kept bounded, shown by
``queue show``, and gone with its message.

The store is tested on SQLite and PostgreSQL (`store` fixture); the end-to-end test
runs the real ``backupmx serve`` against a port where nothing listens, then Postfix's
smtp-sink answering 450 to RCPT, then smtp-sink accepting, and reads the history
through the real ``queue show`` (text and ``--json``).  Every wait is bounded.
"""

from __future__ import annotations

import json
import smtplib
import sqlite3
from contextlib import closing
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select

from backupmx.queue.attempts import KEPT_ATTEMPTS
from backupmx.queue.models import delivery_attempts
from backupmx.queue.records import Result, utcnow
from backupmx.queue.state import Event
from backupmx.queue.store import Store
from tests.support.ports import free_port
from tests.support.primary_sink import SmtpSink
from tests.support.queued import message
from tests.support.smtp_client import queue_id
from tests.support.waiting import wait_for

RELAY = "mx1.example.test[127.0.0.2]:25"


async def attempt_rows(store: Store) -> int:
    async with store.engine.connect() as conn:
        return int(
            (await conn.execute(select(func.count()).select_from(delivery_attempts))).one()[0]
        )


async def test_each_applied_result_adds_an_attempt_with_its_host_and_reply(store: Store) -> None:
    m = message("a@example.test", "b@example.test")
    await store.enqueue(m)
    a, b = sorted(await store.claim("n", 10), key=lambda c: c.address)
    later = utcnow() + timedelta(minutes=5)
    refused = "connect to mx1.example.test[127.0.0.2]:25: Connection refused"
    await store.record(
        "n",
        [
            Result(a.recipient_id, Event.TEMPFAIL, refused, later, a.attempts),
            Result(b.recipient_id, Event.SUCCESS, None, None, b.attempts, RELAY, "250 2.0.0 Ok"),
        ],
    )
    view = await store.message(m.id)
    histories = await store.histories(view)
    (deferred,) = histories[a.recipient_id].attempts
    assert (deferred.number, deferred.host, deferred.outcome) == (1, None, "deferred")
    assert deferred.reply == refused  # no reply: the error says why
    (delivered,) = histories[b.recipient_id].attempts
    assert (delivered.host, delivered.outcome, delivered.reply) == (
        RELAY,
        "delivered",
        "250 2.0.0 Ok",
    )
    assert histories[b.recipient_id].not_kept == 0
    assert histories[a.recipient_id].to_json()["attempts_history"][0]["at"].endswith("Z")


async def test_a_result_dropped_by_the_fence_records_no_attempt(store: Store) -> None:
    m = message("a@example.test")
    await store.enqueue(m)
    (first,) = await store.claim("node-a", 10)
    await store.give_back_leases("node-a")  # node-a's fence fell
    (second,) = await store.claim("node-b", 10)
    late = Result(first.recipient_id, Event.SUCCESS, None, None, first.attempts, RELAY, "250 ok")
    assert await store.record("node-a", [late]) == 0  # result_after_lease_lost
    assert await attempt_rows(store) == 0
    done = Result(second.recipient_id, Event.SUCCESS, None, None, second.attempts, RELAY, "250 ok")
    assert await store.record("node-b", [done]) == 1
    history = (await store.histories(await store.message(m.id)))[second.recipient_id]
    assert [a.number for a in history.attempts] == [2]
    assert history.not_kept == 1  # the first claim's result never came


async def test_the_history_keeps_the_last_attempts_and_counts_the_earlier_ones(
    store: Store,
) -> None:
    m = message("a@example.test")
    await store.enqueue(m)
    start = utcnow()
    for n in range(15):
        (claim,) = await store.claim("n", 10, now=start + timedelta(minutes=n))
        reason = f"451 4.3.0 try later ({n + 1})"
        retry = start + timedelta(minutes=n, seconds=30)
        await store.record(
            "n", [Result(claim.recipient_id, Event.TEMPFAIL, reason, retry, claim.attempts)]
        )
    view = await store.message(m.id)
    (recipient,) = view.recipients
    assert recipient.attempts == 15  # the whole count stays
    history = (await store.histories(view))[recipient.id]
    assert KEPT_ATTEMPTS == 10
    assert [a.number for a in history.attempts] == list(range(6, 16))
    assert history.attempts[-1].reply == "451 4.3.0 try later (15)"
    assert history.not_kept == 5
    assert await attempt_rows(store) == KEPT_ATTEMPTS


async def test_the_history_goes_with_its_message(store: Store) -> None:
    finished, deleted = message("a@example.test"), message("b@example.test")
    await store.enqueue(finished)
    await store.enqueue(deleted)
    claims = {c.message_id: c for c in await store.claim("n", 10)}
    retry = utcnow()
    await store.record(
        "n",
        [
            Result(claims[finished.id].recipient_id, Event.SUCCESS, claim_attempts=1),
            Result(claims[deleted.id].recipient_id, Event.TEMPFAIL, "451 later", retry, 1),
        ],
    )
    assert await attempt_rows(store) == 2
    assert await store.forget_finished(utcnow() + timedelta(seconds=1)) == 1
    assert await attempt_rows(store) == 1
    assert (await store.delete([claims[deleted.id].recipient_id])).changed == 1
    assert await attempt_rows(store) == 0


def send(server: Any, recipient: str) -> str:
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("alice@sender.test")
        client.rcpt(recipient)
        code, reply = client.data(b"Subject: history\r\n\r\nbody\r\n")
    assert code == 250, reply
    return queue_id(reply.decode())


def attempts_made(server: Any) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(server.directory / "queue.db", timeout=10)) as db:
        return db.execute(
            "SELECT number, host, outcome, reply FROM delivery_attempts ORDER BY number"
        ).fetchall()


def test_queue_show_lists_each_attempt_of_a_deferred_then_delivered_recipient(
    server_factory: Any,
) -> None:
    """Each try is made by `queue flush` (the probes, an hour apart, stay out of it)."""
    port = free_port()  # nothing listens here yet: connection refused
    server = server_factory(
        domain=[{"name": "example.test", "primary": [f"127.0.0.1:{port}"]}],
        delivery={"probe_interval": "1h", "retry_min": "1s", "retry_max": "2s"},
    ).start()
    queue = send(server, "kim@example.test")
    server.cli("queue", "flush", "--all")
    wait_for(lambda: attempts_made(server), 15, "the refused attempt")
    refusing = SmtpSink("127.0.0.1", port, "-r", "RCPT")  # 450 to every RCPT
    accepting = SmtpSink("127.0.0.1", port)
    try:
        refusing.start()
        server.cli("queue", "flush", "--all")
        wait_for(
            lambda: any(row[3].startswith("450") for row in attempts_made(server)),
            15,
            "the 450 from smtp-sink",
        )
        refusing.stop()
        accepting.start()
        server.cli("queue", "flush", "--all")  # in case a retry found the port closed
        wait_for(lambda: attempts_made(server)[-1][2] == "delivered", 20, "the delivery")
    finally:
        refusing.close()
        accepting.close()

    shown = json.loads(server.cli("queue", "show", queue, "--json").stdout)
    (recipient,) = shown["recipients"]
    history = recipient["attempts_history"]
    relay = f"127.0.0.1[127.0.0.1]:{port}"
    first, last = history[0], history[-1]
    assert (first["attempt"], first["host"], first["outcome"]) == (1, None, "deferred")
    assert "Connection refused" in first["reply"]
    assert any(
        a["host"] == relay and a["outcome"] == "deferred" and a["reply"].startswith("450")
        for a in history
    )
    assert (last["host"], last["outcome"]) == (relay, "delivered")
    assert last["reply"].startswith("250")
    assert [a["attempt"] for a in history] == list(range(1, recipient["attempts"] + 1))
    assert recipient["attempts_not_kept"] == 0

    text = server.cli("queue", "show", queue).stdout
    assert "Connection refused" in text and relay in text
    assert "ATTEMPT" in text and "OUTCOME" in text and "delivered" in text
