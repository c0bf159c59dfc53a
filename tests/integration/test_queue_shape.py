"""``backupmx queue shape``: pending mail by domain and age, as Postfix's qshape prints it.

Messages of known ages (``received_at`` set in the database) and domains are queued
through the store on SQLite and PostgreSQL; the matrix is read through the real CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update

from backupmx.queue.models import messages
from backupmx.queue.records import Result, utcnow
from backupmx.queue.state import Event
from backupmx.queue.store import Store
from tests.support.queued import message
from tests.support.server import write_config

HEADER = ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"]


def buckets(counts: dict[str, int]) -> list[int]:
    """A row's buckets from counts by column name: ``buckets({"5": 2, "1280+": 1})``."""
    return [counts.get(name, 0) for name in HEADER[1:]]


async def queued(store: Store, sender: str, recipients: list[str], minutes: float) -> str:
    m = message(*recipients)
    m.sender = sender
    await store.enqueue(m)
    async with store.engine.begin() as conn:
        received = utcnow() - timedelta(minutes=minutes)
        await conn.execute(
            update(messages).where(messages.c.id == m.id).values(received_at=received)
        )
    return m.id


def shape(config: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backupmx", "--config", str(config), "queue", "shape", *options],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def rows(document: dict[str, Any]) -> dict[str, tuple[int, list[int]]]:
    return {d["domain"]: (d["total"], d["buckets"]) for d in document["domains"]}


async def test_queue_shape_counts_pending_mail_by_domain_and_age(
    store: Store, database_url: str, tmp_path: Path
) -> None:
    await queued(store, "s@sender.test", ["a@example.test", "b@example.test"], 1)
    await queued(store, "x@Other.Test", ["c@example.test", "d@sub.example.org"], 7)
    await queued(store, "s@sender.test", ["e@example.org"], 30)
    await queued(store, '"odd@quoted"@Sender.test', ["f@example.test"], 2000)
    await queued(store, "", ["h@example.org"], 100)  # a DSN: the null sender
    delivered = await queued(store, "s@sender.test", ["g@example.test"], 3)
    (claim,) = [c for c in await store.claim("n", 10) if c.message_id == delivered]
    await store.record("n", [Result(claim.recipient_id, Event.SUCCESS)])
    await store.give_back_leases("n")  # `sending` is pending too: back to queued for clarity
    config = write_config(tmp_path / "backupmx.toml", {"database": database_url})

    by_recipient = json.loads(shape(config, "--json").stdout)
    assert by_recipient["counts"] == "recipients"
    assert by_recipient["bucket_minutes"] == [int(h) for h in HEADER[1:-1]]
    assert by_recipient["total"] == {
        "total": 7,
        "buckets": buckets({"5": 2, "10": 2, "40": 1, "160": 1, "1280+": 1}),
    }
    assert rows(by_recipient) == {
        "example.test": (4, buckets({"5": 2, "10": 1, "1280+": 1})),
        "example.org": (2, buckets({"40": 1, "160": 1})),
        "sub.example.org": (1, buckets({"10": 1})),
    }
    order = [d["domain"] for d in by_recipient["domains"]]
    assert order == ["example.test", "example.org", "sub.example.org"]  # largest first

    by_sender = json.loads(shape(config, "--sender", "--json").stdout)
    assert by_sender["counts"] == "messages"
    assert rows(by_sender) == {
        "sender.test": (
            3,
            buckets({"5": 1, "40": 1, "1280+": 1}),
        ),  # after the last "@", lower case
        "other.test": (1, buckets({"10": 1})),
        "": (1, buckets({"160": 1})),
    }

    parents = rows(json.loads(shape(config, "--parent", "--min-subdomains", "1", "--json").stdout))
    assert parents[".example.org"] == (3, buckets({"10": 1, "40": 1, "160": 1}))  # itself and sub.
    assert ".test" not in parents and ".example.test" not in parents
    assert ".example.org" not in rows(json.loads(shape(config, "--parent", "--json").stdout))

    lines = shape(config).stdout.splitlines()
    assert lines[0].split() == HEADER
    assert lines[1].split() == ["TOTAL", "7", "2", "2", "0", "1", "0", "1", "0", "0", "0", "1"]
    assert lines[2].split() == [
        "example.test",
        "4",
        "2",
        "1",
        "0",
        "0",
        "0",
        "0",
        "0",
        "0",
        "0",
        "1",
    ]
    assert "<>" in shape(config, "--sender").stdout


async def test_queue_shape_of_an_empty_queue_is_a_total_of_zero(
    store: Store, database_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "backupmx.toml", {"database": database_url})
    lines = shape(config).stdout.splitlines()
    assert lines[1].split() == ["TOTAL", "0", *(["0"] * 10)]
    assert len(lines) == 2
