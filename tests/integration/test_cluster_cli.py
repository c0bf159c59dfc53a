"""The operator's view of several nodes on one queue, through the real CLI, on SQLite and
on a real PostgreSQL.

Other nodes are simulated in the database itself, as they would leave it: a row in
``nodes`` per ``serve`` process (its heartbeat), and recipients in ``sending`` owned
by one of them.  No ``serve`` runs: the CLI reads the queue alone.  A delivery that
ends while a hold waits is the row going back to ``queued`` from another thread.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, update
from sqlalchemy.engine import Engine

from backupmx.queue.database import open_writer_engine, upgrade
from backupmx.queue.models import nodes, primary_views, recipients
from backupmx.queue.records import utcnow
from backupmx.queue.store import Store
from tests.support.queued import message
from tests.support.server import ServerProcess

LIVE = "bmx-a:mx2.backup.test"
DEAD = "bmx-b:mx3.backup.test"
STOPPED = "bmx-c:mx4.backup.test"


@dataclass
class Cluster:
    cli: ServerProcess  # its config and CLI only: no serve runs
    engine: Engine
    busy: str  # a@example.test is being sent by LIVE, b@example.test is queued
    idle: str  # c@example.test, queued

    def json(self, *args: str) -> Any:
        # `status` exits 1 here: no serve answers, only the queue is simulated.
        return json.loads(self.cli.cli(*args, check=args[0] != "status").stdout)

    def states(self) -> dict[str, dict[str, str]]:
        listed = self.json("queue", "list", "--json", "--all")
        return {m["id"]: {r["address"]: r["state"] for r in m["recipients"]} for m in listed}

    def delivery_ends(self) -> None:
        """LIVE's delivery of a@example.test ends with a deferral: back to the queue."""
        with self.engine.begin() as conn:
            conn.execute(
                update(recipients)
                .where(recipients.c.address == "a@example.test")
                .values(state="queued", lease_owner=None)
            )


async def fill(url: str) -> tuple[str, str]:
    store = Store.open(url)
    try:
        await upgrade(store.engine)
        await store.start()
        busy = message("a@example.test", "b@example.test")
        idle = message("c@example.test")
        for new in (busy, idle):
            await store.enqueue(new)
    finally:
        await store.close()
    return busy.id, idle.id


def heartbeats(engine: Engine) -> None:
    """Three nodes: LIVE beat 2 s ago, DEAD 10 minutes ago, STOPPED stopped cleanly."""
    now = utcnow()

    def node(name: str, seen_ago: float, **more: Any) -> dict[str, Any]:
        return {
            "name": name,
            "hostname": name.split(":")[0],
            "version": "1.0",
            "listen": "127.0.0.1:25, [::1]:25",
            "pid": 4242,
            "started_at": now - timedelta(hours=3),
            "last_seen": now - timedelta(seconds=seen_ago),
            "in_flight": 0,
            "delivered": 0,
            "delivery_rate": 0.0,
            "stopped_at": None,
            **more,
        }

    with engine.begin() as conn:
        conn.execute(
            insert(nodes),
            [
                node(LIVE, 2, in_flight=3, delivered=1200, delivery_rate=4.25),
                node(DEAD, 600),
                node(STOPPED, 3600, stopped_at=now - timedelta(hours=1)),
            ],
        )
        conn.execute(
            update(recipients)
            .where(recipients.c.address == "a@example.test")
            .values(state="sending", lease_owner=LIVE, attempts=1)
        )


@pytest.fixture
def cluster(database_url: str, tmp_path: Path) -> Iterator[Cluster]:
    busy, idle = asyncio.run(fill(database_url))
    engine = open_writer_engine(database_url)
    heartbeats(engine)
    cli = ServerProcess(tmp_path, database=database_url, delivery={"lease": "30s"})
    cli.write_config()
    try:
        yield Cluster(cli, engine, busy, idle)
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- nodes, status


def test_nodes_lists_live_dead_and_stopped_nodes_with_their_recipients_in_flight(
    cluster: Cluster,
) -> None:
    listed = {n["name"]: n for n in cluster.json("nodes", "--json")}
    assert list(listed) == [LIVE, DEAD, STOPPED]
    assert {name: n["state"] for name, n in listed.items()} == {
        LIVE: "live",
        DEAD: "dead",
        STOPPED: "stopped",
    }
    live = listed[LIVE]
    # In flight: the queue's own count of its sending rows; beside it what the node said.
    assert (live["in_flight"], live["reported_in_flight"]) == (1, 3)
    assert (live["delivered"], live["delivery_rate"]) == (1200, 4.25)
    assert 1 <= live["heartbeat_age_seconds"] < 60
    assert live["listen"] == ["127.0.0.1:25", "[::1]:25"]
    assert (live["hostname"], live["version"], live["pid"]) == ("bmx-a", "1.0", 4242)
    assert live["stopped_at"] is None and listed[STOPPED]["stopped_at"].endswith("Z")
    assert listed[DEAD]["in_flight"] == 0

    header, live_row, dead_row, stopped_row = cluster.cli.cli("nodes").stdout.splitlines()
    assert header.split()[:5] == ["NODE", "STATE", "HEARTBEAT", "IN", "FLIGHT"]
    name, state, heartbeat, in_flight, rate, reported, delivered, started = live_row.split()[:8]
    assert (name, state, in_flight, rate, reported, delivered, started) == (
        LIVE, "live", "1", "4.2/s", "3", "1200", "3h"
    )  # fmt: skip
    assert heartbeat.endswith("s")
    assert dead_row.split()[:3] == [DEAD, "dead", "10m"]
    assert stopped_row.split()[:3] == [STOPPED, "stopped", "1h"]


def test_status_shows_each_node_in_text_and_json(cluster: Cluster) -> None:
    facts = cluster.json("status", "--json")
    assert [(n["name"], n["state"], n["in_flight"]) for n in facts["nodes"]] == [
        (LIVE, "live", 1),
        (DEAD, "dead", 0),
        (STOPPED, "stopped", 0),
    ]
    output = cluster.cli.cli("status", check=False).stdout
    assert "nodes      1 live, 1 dead, 1 stopped" in output
    line = next(line for line in output.splitlines() if line.startswith(LIVE)).split()
    assert [line[1], line[3], line[4]] == ["live", "1", "4.2/s"]


def test_domains_name_the_live_nodes_that_reach_the_primary(cluster: Cluster) -> None:
    now = utcnow()
    views = [(LIVE, "up"), (DEAD, "up"), (STOPPED, "down")]
    with cluster.engine.begin() as conn:
        conn.execute(
            insert(primary_views),
            [
                {"domain": "example.test", "node": n, "state": s, "since": now, "updated_at": now}
                for n, s in views
            ],
        )
    (domain,) = [d for d in cluster.json("domains", "--json") if d["domain"] == "example.test"]
    assert domain["reached_by"] == [LIVE]  # a dead node's view counts no more
    status = cluster.json("status", "--json")
    assert [d["reached_by"] for d in status["domains"] if d["domain"] == "example.test"] == [[LIVE]]
    line = next(ln for ln in cluster.cli.cli("domains").stdout.splitlines() if "example.test" in ln)
    assert LIVE in line.split()


# --------------------------------------------------------------------------- queue list, show


def test_queue_list_and_show_name_the_node_sending_a_recipient(cluster: Cluster) -> None:
    (busy,) = [m for m in cluster.json("queue", "list", "--json") if m["id"] == cluster.busy]
    owners = {r["address"]: r["lease_owner"] for r in busy["recipients"]}
    assert owners == {"a@example.test": LIVE, "b@example.test": None}
    shown = cluster.json("queue", "show", cluster.busy, "--json")
    assert [r["lease_owner"] for r in shown["recipients"]] == [LIVE, None]
    text = cluster.cli.cli("queue", "show", cluster.busy).stdout
    assert f"a@example.test  sending  {LIVE}" in text


# --------------------------------------------------------------------------- hold, delete


def test_hold_leaves_a_recipient_in_flight_alone_says_so_and_exits_1(cluster: Cluster) -> None:
    result = cluster.cli.cli("queue", "hold", cluster.busy, "--wait", "1", check=False)
    assert result.returncode == 1, result.stderr
    assert f"{cluster.busy} <a@example.test>: not held: being sent by node {LIVE}" in (
        result.stderr
    )
    assert "hold: 1 recipient(s) of 1 message(s)" in result.stdout
    assert cluster.states()[cluster.busy] == {"a@example.test": "sending", "b@example.test": "held"}


def test_delete_keeps_a_message_in_flight_says_so_and_exits_1(cluster: Cluster) -> None:
    result = cluster.cli.cli(
        "queue", "delete", cluster.busy, cluster.idle, "--wait", "1", "--json", check=False
    )
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout) == {
        "action": "delete",
        "dry_run": False,
        "messages": 2,
        "recipients": 3,
        "changed": 1,  # the idle message; the busy one keeps the recipient being sent
        "removed": 2,
        "unknown": [],
        "in_flight": [{"id": cluster.busy, "recipient": "a@example.test", "lease_owner": LIVE}],
    }
    assert cluster.states() == {cluster.busy: {"a@example.test": "sending"}}


def test_delete_decides_on_the_state_a_result_being_written_leaves(
    cluster: Cluster, database_url: str
) -> None:
    """The delete reads the recipients it decides on locked, in its own transaction: it
    waits for a result being written (here a@ delivered, not yet committed) and then
    sees it, rather than the ``sending`` of a moment before."""

    async def delete_during_a_result() -> Any:
        store = Store.open(database_url)
        try:
            chosen = [r.id for r in (await store.message(cluster.busy)).recipients]
            with cluster.engine.connect() as result:
                result.execute(
                    update(recipients)
                    .where(recipients.c.address == "a@example.test")
                    .values(state="delivered", lease_owner=None)
                )
                deleting = asyncio.create_task(store.delete(chosen))
                await asyncio.sleep(1.0)
                assert not deleting.done(), "the delete did not wait for the result"
                result.commit()
            return await deleting
        finally:
            await store.close()

    acted = asyncio.run(delete_during_a_result())
    assert (acted.changed, acted.deleted, acted.in_flight) == (2, 1, [])
    assert cluster.busy not in cluster.states()


def test_hold_waits_for_a_delivery_to_end_then_holds_every_recipient(cluster: Cluster) -> None:
    # Later than the CLI's start (under a second), so that the hold sees the recipient
    # being sent and waits: without the wait it would exit 1 with a@ still sending.
    ends = threading.Timer(2.0, cluster.delivery_ends)
    ends.start()
    try:
        result = cluster.cli.cli("queue", "hold", cluster.busy, "--wait", "30", "--json")
    finally:
        ends.join()
    assert json.loads(result.stdout)["in_flight"] == []
    assert json.loads(result.stdout)["changed"] == 2
    assert cluster.states()[cluster.busy] == {"a@example.test": "held", "b@example.test": "held"}
