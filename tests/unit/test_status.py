"""`backupmx status`, `nodes` and `queue …` output helpers, pure: the queue-age bar chart,
the disk line, the progress bar of long bulk actions, the nodes table, what a hold
or a delete says of the recipients it left to the node sending them, the problem lines
of `status` (which fail the health check, which only warn) and where the control
socket is by default.

The commands themselves, run as an operator runs them against a populated queue,
are in tests/integration/test_status.py.
"""

from __future__ import annotations

import io
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from backupmx import config as configuration
from backupmx.cli.nodes import render, summary
from backupmx.cli.queue import Progress, left_alone
from backupmx.cli.status import bar_chart, queue_problems, server_problems, space_line
from backupmx.control import RUNTIME_SOCKET, NoAnswer, socket_path
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


# --------------------------------------------------------------------------- health


SOCKET = Path("/var/lib/backupmx/queue.sock")
RUNNING = {
    "node": "bmx-a:mx2",
    "state": "running",
    "accepting": True,
    "fence_up": True,
    "store": {"reachable": True, "error": None},
}


def kinds(problems: list[Any]) -> list[tuple[str, str]]:
    return [(p.kind, p.severity) for p in problems]


def test_a_healthy_server_has_no_problem() -> None:
    assert server_problems(SOCKET, RUNNING, None) == []


def test_no_answer_is_one_error_line_naming_the_control_socket() -> None:
    (gone,) = server_problems(SOCKET, None, NoAnswer("No such file or directory", False))
    assert str(gone) == f"error: server not running (no answer on control socket {SOCKET})"
    assert gone.to_json() == {
        "kind": "server_not_running",
        "severity": "error",
        "message": f"server not running (no answer on control socket {SOCKET})",
    }
    (hung,) = server_problems(SOCKET, None, NoAnswer("no answer within 3s", None))
    assert str(hung) == f"error: server not answering ({SOCKET}: no answer within 3s)"


def test_a_server_that_answers_but_cannot_take_or_send_mail_fails_the_check() -> None:
    starting = RUNNING | {"state": "starting", "accepting": False, "fence_up": None, "store": None}
    assert kinds(server_problems(SOCKET, starting, None)) == [("server_starting", "error")]
    stopping = RUNNING | {"state": "stopping", "accepting": False}
    assert kinds(server_problems(SOCKET, stopping, None)) == [("server_stopping", "error")]
    troubled = RUNNING | {
        "fence_up": False,
        "store": {"reachable": False, "error": "the queue file /q.db is missing"},
    }
    found = server_problems(SOCKET, troubled, None)
    assert kinds(found) == [("server_database_unreachable", "error"), ("node_fenced", "error")]
    assert "the queue file /q.db is missing" in found[0].message
    assert found[1].message.startswith("node bmx-a:mx2 fenced")


def test_a_primary_down_is_a_warning_and_an_unreadable_queue_an_error() -> None:
    down = {"domain": "example.com", "backed_up": True, "state": "down", "queued": 3, "held": 1,
            "since": "2026-12-06T09:00:00Z"}  # fmt: skip
    not_ours = down | {"domain": "sender.test", "backed_up": False}
    up = down | {"domain": "example.net", "state": "up"}
    (warning,) = queue_problems([down, not_ours, up], None, NOW)
    assert str(warning) == (
        "warning: primary of example.com down for 3h: 3 recipient(s) waiting, 1 held"
    )
    assert warning.kind == "primary_down"
    (error,) = queue_problems(None, "database unreachable: postgresql://…: refused", NOW)
    assert (error.kind, error.severity) == ("database_unreachable", "error")


def test_the_control_socket_sits_beside_the_sqlite_queue_else_in_run() -> None:
    def where(**settings: Any) -> Path:
        return socket_path(configuration.load(None, settings))

    assert where() == Path("backupmx.sock")  # the quick start's ./backupmx.db
    assert where(database="sqlite:////var/lib/backupmx/queue.db") == SOCKET
    assert where(database="postgresql://bmx@db.example.net/bmx") == RUNTIME_SOCKET
    assert where(control_socket="/srv/bmx.sock", database="sqlite:///q.db") == Path("/srv/bmx.sock")
