"""`backupmx queue …` per recipient, as a Postfix or Exim admin uses it: filters select
recipients and actions touch those only, IDs in pipelines (``--ids``, ``-``), ``--count``,
the regular-expression, age and size filters, mixed known and unknown IDs, and a
listing of 100,000 messages streamed in bounded memory.  The queue is filled through
the store (or its bulk insert path); the real command line runs as its own process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from backupmx.queue.database import upgrade
from backupmx.queue.inserter import Inserter
from backupmx.queue.records import BytesBody, NewMessage, NewRecipient, new_queue_id, utcnow
from backupmx.queue.store import Store
from tests.support.server import write_config


def new(sender: str, rcpts: list[str], *, subject: str = "hello", age: float = 60,
        size: int = 0, client: str = "192.0.2.1") -> NewMessage:  # fmt: skip
    body = f"Subject: {subject}\r\n\r\n".encode() + b"x" * size + b"body\r\n"
    return NewMessage(
        id=new_queue_id(), sender=sender,
        recipients=[NewRecipient(r, r.rpartition("@")[2]) for r in rcpts],
        body=BytesBody(body), client_ip=client, client_helo="client.test",
        protocol="ESMTP", session_id="t", received_at=utcnow() - timedelta(seconds=age),
    )  # fmt: skip


class Queue:
    def __init__(self, directory: Path) -> None:
        self.url = f"sqlite:///{directory / 'queue.db'}"
        self.config = write_config(directory / "backupmx.toml", {"database": self.url})
        asyncio.run(self._migrate())

    async def _migrate(self) -> None:
        store = Store.open(self.url)
        await upgrade(store.engine)
        await store.close()

    def add(self, *messages: NewMessage) -> list[str]:
        async def enqueue() -> None:
            store = Store.open(self.url)
            await store.start()
            for m in messages:
                await store.enqueue(m)
            await store.close()

        asyncio.run(enqueue())
        return [m.id for m in messages]

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "backupmx", "--config", str(self.config), "queue", *args],
            capture_output=True, text=True, timeout=120, input=stdin,
        )  # fmt: skip

    def json(self, *args: str) -> Any:
        result = self.cli(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def states(self) -> dict[str, dict[str, str]]:
        return {
            m["id"]: {r["address"]: r["state"] for r in m["recipients"]}
            for m in self.json("list", "--all")
        }


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[Queue]:
    yield Queue(tmp_path)


def test_hold_by_domain_holds_only_that_domains_recipient(queue: Queue) -> None:
    (mixed,) = queue.add(
        new("a@sender.test", ["x@x.example.org", "y@example.test", "z@example.test"])
    )
    dry = queue.cli("hold", "--domain", "x.example.org")
    assert "would act on 1 recipient(s) of 1 message(s)" in dry.stdout
    done = queue.cli("hold", "--domain", "x.example.org", "--yes")
    assert done.returncode == 0 and "hold: 1 recipient(s) of 1 message(s)" in done.stdout
    assert queue.states()[mixed] == {
        "x@x.example.org": "held", "y@example.test": "queued", "z@example.test": "queued"
    }  # fmt: skip
    listed = queue.json("list", "--state", "held")
    assert [[r["address"] for r in m["recipients"]] for m in listed] == [["x@x.example.org"]]


def test_delete_of_some_recipients_keeps_the_message_and_the_last_one_deletes_it(
    queue: Queue,
) -> None:
    (mixed,) = queue.add(new("a@sender.test", ["x@x.example.org", "y@example.test"]))
    done = queue.json("delete", "--domain", "example.test", "--yes")
    assert (done["removed"], done["changed"], done["recipients"]) == (1, 0, 1)
    assert queue.states() == {mixed: {"x@x.example.org": "queued"}}
    assert queue.cli("show", mixed).returncode == 0
    done = queue.json("delete", mixed)
    assert (done["removed"], done["changed"]) == (1, 1)
    assert queue.states() == {}
    assert queue.cli("list").stdout.strip() == "queue is empty"


def test_mixed_ids_act_on_the_known_and_name_the_unknown(queue: Queue) -> None:
    first, second = queue.add(
        new("a@s.test", ["a@example.test"]), new("b@s.test", ["b@example.test"])
    )
    result = queue.cli("hold", first, "NOPE", second, "ALSO-NOPE")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "backupmx: NOPE: no such message in the queue",
        "backupmx: ALSO-NOPE: no such message in the queue",
    ]
    assert queue.states() == {first: {"a@example.test": "held"}, second: {"b@example.test": "held"}}


def test_ids_pipeline_and_count(queue: Queue) -> None:
    ids = queue.add(
        new("a@s.test", ["a@example.test", "b@other.test"]), new("b@s.test", ["c@example.test"]),
        new("c@s.test", ["d@other.test"]),
    )  # fmt: skip
    listed = queue.cli("list", "--ids", "--domain", "example.test").stdout
    assert listed.splitlines() == ids[:2]
    assert queue.cli("list", "--count", "--domain", "example.test").stdout.strip() == "2"
    assert queue.json("list", "--count", "--domain", "other.test") == {
        "messages": 2,
        "recipients": 2,
    }
    held = queue.cli("hold", "--domain", "example.test", "-", stdin=listed)
    assert held.returncode == 0 and "hold: 2 recipient(s) of 2 message(s)" in held.stdout
    assert queue.states()[ids[0]] == {"a@example.test": "held", "b@other.test": "queued"}
    assert queue.cli("release", "-", stdin="").returncode == 0  # an empty pipeline: nothing


def test_list_state_delivered_and_default_listing_show_only_those_recipients(queue: Queue) -> None:
    queue.add(new("a@s.test", ["a@example.test", "b@example.test"]))

    async def deliver_one() -> None:
        from backupmx.queue.records import Result
        from backupmx.queue.state import Event

        store = Store.open(queue.url)
        await store.start()
        claim = next(c for c in await store.claim("n", 10) if c.address == "a@example.test")
        await store.record("n", [Result(claim.recipient_id, Event.SUCCESS)])
        await store.give_back_leases("n")
        await store.close()

    asyncio.run(deliver_one())
    states = lambda listing: [(r["address"], r["state"]) for m in listing for r in m["recipients"]]  # noqa: E731
    assert states(queue.json("list", "--state", "delivered")) == [("a@example.test", "delivered")]
    assert states(queue.json("list")) == [("b@example.test", "queued")]
    assert len(states(queue.json("list", "--all"))) == 2
    assert queue.cli("list", "--state", "held").stdout.strip() == "no message matches"


def test_regex_age_and_size_filters(queue: Queue) -> None:
    ids = queue.add(
        new("Alice@s.test", ["a@x.test"], subject="=?utf-8?q?Rechnung_f=C3=BCr?= Mai", age=7200),
        new("bob@s.test", ["b@x.test"], subject="meeting", size=20_000, client="198.51.100.7"),
    )  # fmt: skip
    listed = lambda *f: [m["id"] for m in queue.json("list", *f)]  # noqa: E731
    assert listed("--sender-regex", "^alice@") == ids[:1]
    assert listed("--recipient-regex", r"^b@x\.test$") == ids[1:]
    assert listed("--subject-regex", "rechnung für") == ids[:1]
    assert listed("--client-regex", r"^198\.51\.") == ids[1:]
    assert listed("--younger-than", "1h") == ids[1:]
    assert listed("--older-than", "1h") == ids[:1]
    assert listed("--larger-than", "10k") == ids[1:]
    bad = queue.cli("list", "--subject-regex", "(unclosed")
    assert bad.returncode == 2 and "not a regular expression" in bad.stderr
    assert queue.cli("list", "--larger-than", "lots").returncode == 2


def test_hold_all_acts_at_once_and_usage_errors_exit_2(queue: Queue) -> None:
    ids = queue.add(new("a@s.test", ["a@example.test"]), new("b@s.test", ["b@example.net"]))
    assert "hold: 2 recipient(s) of 2 message(s)" in queue.cli("hold", "--all").stdout
    assert {s for m in queue.states().values() for s in m.values()} == {"held"}
    assert "release: 2 recipient(s)" in queue.cli("release", "--all").stdout
    for args in (("hold",), ("hold", "--all", ids[0]), ("hold", "--all", "--domain", "x.test")):
        result = queue.cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- streaming

MESSAGES = 100_000


def fill(url: str, count: int) -> None:
    """`count` one-recipient messages, oldest first, through the store's bulk insert."""
    engine = create_engine(url)
    inserter, now = Inserter(engine.dialect), utcnow()
    for first in range(0, count, 5000):
        batch = [
            NewMessage(
                id=new_queue_id(), sender=f"s{n}@sender.test",
                recipients=[NewRecipient(f"r{n}@example.test", "example.test")],
                body=BytesBody(b"Subject: bulk %d\r\n\r\nbody\r\n" % n), client_ip="192.0.2.1",
                client_helo="client.test", protocol="ESMTP", session_id="t",
                received_at=now - timedelta(seconds=count - n),
            )
            for n in range(first, min(first + 5000, count))
        ]  # fmt: skip
        with engine.begin() as conn:
            inserter.insert(conn, batch, now)
    engine.dispose()


def test_list_json_of_100000_messages_streams_in_bounded_memory(
    queue: Queue, tmp_path: Path
) -> None:
    fill(queue.url, MESSAGES)
    output = tmp_path / "list.json"
    started = time.monotonic()
    # The peak is measured by a small parent of the listing: a child forked from pytest
    # itself would start with pytest's resident size as its high-water mark.
    measure = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True);"
        " print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)"
    )
    listing = [sys.executable, "-m", "backupmx", "--config", str(queue.config), "queue", "list"]
    with output.open("wb") as out:
        measured = subprocess.run(
            [sys.executable, "-c", measure, *listing, "--json"],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert measured.returncode == 0, measured.stderr
    peak_mb = int(measured.stderr.split()[-1]) / 1024  # KiB on Linux
    print(f"\nqueue list --json of {MESSAGES} messages: peak RSS {peak_mb:.0f} MB")
    listed = json.loads(output.read_bytes())
    assert len(listed) == MESSAGES
    assert [m["sender"] for m in listed[:2]] == ["s0@sender.test", "s1@sender.test"]  # oldest first
    assert listed[-1]["recipients"][0]["address"] == f"r{MESSAGES - 1}@example.test"
    # Holding them all took 747 MB before the listing streamed; streamed, about 70 MB.
    assert peak_mb < 150, f"peak RSS {peak_mb:.0f} MB"
    assert time.monotonic() - started < 60
