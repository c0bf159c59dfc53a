"""`backupmx status`, `nodes` and `queue …` output helpers, pure: the queue-age bar chart,
the disk line, the progress bar of long bulk actions, the nodes table, and what a hold
or a delete says of the recipients it left to the node sending them.

The commands themselves, run as an operator runs them against a populated queue,
are in tests/integration/test_status.py.
"""

from __future__ import annotations

import io
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from backupmx.cli.nodes import render, summary
from backupmx.cli.queue import Progress, left_alone
from backupmx.cli.status import bar_chart, space_line
from backupmx.queue.records import InFlight, NodeState, NodeView, node_state

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def node(name: str, age: float, state: NodeState, **more: Any) -> NodeView:
    started = NOW - timedelta(hours=3)
    seen = NOW - timedelta(seconds=age)
    view = NodeView(
        name, name.split(":")[0], "1.0", "127.0.0.1:25, [::1]:25", 4242, started, seen, age,
        None, state, 0, 0, 0, 0.0,
    )  # fmt: skip
    return replace(view, **more)


def test_bar_chart_scales_to_the_largest_bucket() -> None:
    histogram = [("< 5m", 2), ("5m-1h", 0), ("1h-4h", 1), ("> 5d", 1)]
    lines = bar_chart(histogram).splitlines()
    assert [line.count("#") for line in lines] == [40, 0, 20, 20]
    assert [line.split()[-1] for line in lines] == ["2", "0", "1", "1"]


def test_disk_line_says_what_the_queue_takes_and_what_is_free_beside_it() -> None:
    assert space_line(1536 * 1024, 20 * 1024**3) == (
        "1.5 MiB used by the queue, 20.0 GiB free beside it"
    )
    assert space_line(512, 3 * 1024**4) == "512 B used by the queue, 3.0 TiB free beside it"
    # PostgreSQL: the free space is the database server's, not ours to see.
    assert space_line(8 * 1024**3, None) == "8.0 GiB used by the queue"


def test_progress_bar_is_drawn_only_on_a_terminal_for_long_actions() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    progress = Progress("delete", 2000, screen)
    progress.advance(500)
    progress.advance(1500)
    progress.done()
    assert screen.getvalue() == (
        "\rdelete [#######.......................] 500/2000"
        "\rdelete [##############################] 2000/2000\n"
    )
    quiet = Terminal()
    Progress("delete", 10, quiet).advance(10)  # one batch: nothing to watch
    piped = io.StringIO()
    Progress("delete", 2000, piped).advance(2000)
    assert quiet.getvalue() == piped.getvalue() == ""


def test_a_node_is_live_within_the_lease_dead_after_it_and_stopped_once_stopped() -> None:
    assert node_state(29.9, None, lease=30) is NodeState.LIVE
    assert node_state(30.0, None, lease=30) is NodeState.LIVE
    assert node_state(30.1, None, lease=30) is NodeState.DEAD
    assert node_state(1.0, NOW, lease=30) is NodeState.STOPPED


def test_node_json_has_the_contract_fields() -> None:
    facts = node("bmx-a:mx2", 2.04, NodeState.LIVE, in_flight=5, reported_in_flight=4).to_json()
    assert facts == {
        "name": "bmx-a:mx2",
        "hostname": "bmx-a",
        "version": "1.0",
        "listen": ["127.0.0.1:25", "[::1]:25"],
        "pid": 4242,
        "started_at": "2026-12-06T09:00:00Z",
        "last_seen": "2026-12-06T11:59:57.960000Z",
        "heartbeat_age_seconds": 2.0,
        "state": "live",
        "stopped_at": None,
        "in_flight": 5,
        "reported_in_flight": 4,
        "delivered": 0,
        "delivery_rate": 0.0,
    }


def test_nodes_table_shows_each_node_and_status_its_first_five_columns() -> None:
    nodes = [
        node("bmx-a:mx2", 3, NodeState.LIVE, in_flight=12, reported_in_flight=10,
             delivered=5000, delivery_rate=4.25).to_json(),
        node("bmx-b:mx3", 600, NodeState.DEAD, in_flight=7).to_json(),
    ]  # fmt: skip
    full = render(nodes, NOW).splitlines()
    assert full[0].split() == [
        "NODE", "STATE", "HEARTBEAT", "IN", "FLIGHT", "RATE", "REPORTED", "DELIVERED",
        "STARTED", "PID", "VERSION", "HOSTNAME", "LISTEN",
    ]  # fmt: skip
    assert full[1].split() == [
        "bmx-a:mx2", "live", "3s", "12", "4.2/s", "10", "5000", "3h", "4242", "1.0", "bmx-a",
        "127.0.0.1:25,", "[::1]:25",
    ]  # fmt: skip
    assert full[2].split()[:5] == ["bmx-b:mx3", "dead", "10m", "7", "0.0/s"]
    brief = render(nodes, NOW, brief=True).splitlines()
    assert brief[0].split() == ["NODE", "STATE", "HEARTBEAT", "IN", "FLIGHT", "RATE"]
    assert brief[2].split() == ["bmx-b:mx3", "dead", "10m", "7", "0.0/s"]
    assert summary(nodes) == "1 live, 1 dead"
    assert summary([]) == "none"
    assert render([], NOW) == "no node has written a heartbeat to this queue"


def test_hold_and_delete_name_each_recipient_left_to_the_node_sending_it() -> None:
    sending = [
        InFlight("ID1", "a@example.test", "bmx-a:mx2"),
        InFlight("ID1", "b\x1b[2J@example.test", None),
    ]
    assert left_alone("hold", sending) == [
        "ID1 <a@example.test>: not held: being sent by node bmx-a:mx2",
        "ID1 <b\\x1b[2J@example.test>: not held: being sent by node (unknown)",
    ]
    assert left_alone("delete", sending[:1]) == [
        "ID1 <a@example.test>: not deleted: being sent by node bmx-a:mx2"
    ]
    assert sending[0].to_json() == {
        "id": "ID1",
        "recipient": "a@example.test",
        "lease_owner": "bmx-a:mx2",
    }
