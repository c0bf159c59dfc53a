"""`backupmx status`, `domains` and `queue …` for the person on call, against a populated queue.

The queue is filled through the store API (messages of several ages and domains,
a held one, a DSN to a sender, primaries up and down), then the real command line
runs as a separate process, as an administrator would run it, and its output is
checked for content: which domain is down since when, what is held, how old it
is, what the filters select, what a bulk action would do and then does.

The bar chart and the progress bar alone are in tests/unit/test_status.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from backupmx.queue.database import upgrade
from backupmx.queue.records import BytesBody, NewMessage, NewRecipient, new_queue_id, utcnow
from backupmx.queue.store import Store
from tests.support.ports import free_port
from tests.support.server import ServerProcess, write_config
from tests.support.waiting import wait_for

BODY = b"Received: from client.test\r\nSubject: held\r\n\r\nbody line\r\n"


def backupmx(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as an operator runs it: its own process, text output."""
    return subprocess.run(
        [sys.executable, "-m", "backupmx", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@dataclass
class Populated:
    config: Path
    database: Path
    metrics: str
    ids: dict[str, str]  # name -> queue id

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = backupmx(self.config, *args)
        if check and result.returncode != 0:
            raise AssertionError(f"backupmx {' '.join(args)}: {result.stderr}")
        return result

    def listed(self, *filters: str) -> list[str]:
        """IDs that `queue list --json` selects, oldest first."""
        return [m["id"] for m in json.loads(self.run("queue", "list", "--json", *filters).stdout)]


def message(sender: str, recipients: list[str], age: timedelta, now: datetime) -> NewMessage:
    return NewMessage(
        id=new_queue_id(),
        sender=sender,
        recipients=[NewRecipient(r, r.rpartition("@")[2]) for r in recipients],
        body=BytesBody(BODY),
        client_ip="192.0.2.1",
        client_helo="client.test",
        protocol="ESMTP",
        session_id="test",
        received_at=now - age,
    )


async def fill(url: str) -> dict[str, str]:
    now = utcnow()
    store = Store.open(url)
    try:
        await upgrade(store.engine)
        await store.start()
        messages = {
            "spam": message("spammer@bad.test", ["a@example.com"], timedelta(days=2), now),
            "outage": message(
                "alice@sender.test", ["b@example.com", "c@example.com"], timedelta(hours=3), now
            ),
            "held": message("bob@sender.test", ["d@example.com"], timedelta(minutes=10), now),
            "dsn": message("", ["alice@sender.test"], timedelta(minutes=1), now),
            "fresh": message("carol@sender.test", ["e@example.net"], timedelta(minutes=2), now),
        }
        for new in messages.values():
            await store.enqueue(new)
        held = await store.message(messages["held"].id)
        await store.hold([r.id for r in held.recipients])
        await store.set_domain_state(
            "example.com",
            "down",
            route="mx1.example.com[192.0.2.5]:25",
            reason="connect to mx1.example.com[192.0.2.5]:25: Connection refused",
            now=now - timedelta(hours=3),
        )
        await store.set_domain_state(
            "example.com", probe_result="refused", now=now - timedelta(seconds=10)
        )
        await store.set_domain_state("example.net", "up", now=now - timedelta(days=1))
    finally:
        await store.close()
    return {name: new.id for name, new in messages.items()}


@pytest.fixture
def populated(tmp_path: Path) -> Iterator[Populated]:
    database = tmp_path / "queue.db"
    metrics = f"127.0.0.1:{free_port()}"  # nothing listens there: the server is "stopped"
    config = write_config(
        tmp_path / "backupmx.toml",
        {
            "hostname": "mx2.example.net",
            "listen": ["127.0.0.1:2525"],
            "database": f"sqlite:///{database}",
            "delivery": {"probe_interval": "1h"},
            "metrics": {"listen": metrics},
            "domain": [{"name": "example.com"}, {"name": "example.net"}, {"name": "example.org"}],
        },
    )
    ids = asyncio.run(fill(f"sqlite:///{database}"))
    yield Populated(config, database, metrics, ids)


def row(output: str, first: str) -> list[str]:
    """The table row starting with `first`, split into its columns."""
    for line in output.splitlines():
        if line.split() and line.split()[0] == first:
            return line.split()
    raise AssertionError(f"no row {first!r} in:\n{output}")


# --------------------------------------------------------------------------- status


def test_status_shows_server_queue_primaries_and_age_chart(populated: Populated) -> None:
    result = populated.run("status", check=False)
    assert result.returncode == 1, "no server answers"
    output = result.stdout
    socket = populated.database.with_suffix(".sock")
    assert output.splitlines()[:3] == [
        f"error: server not running (no answer on control socket {socket})",
        "warning: primary of example.com down for 3h: 3 recipient(s) waiting, 1 held",
        "",
    ]
    assert "backupmx on mx2.example.net" in output
    assert "server     not answering (see above)" in output
    assert "listen     127.0.0.1:2525" in output
    assert f"database   sqlite:///{populated.database} (schema " in output
    assert re.search(r"disk       [\d.]+ \S+ used by the queue, [\d.]+ \S+ free beside it", output)
    assert "5 message(s); recipients: queued 5, sending 0, held 1, delivered 0" in output
    assert re.search(r"oldest     \S+Z \(2d ago\)", output), output

    assert row(output, "example.com") == ["example.com", "down", "3h", "3", "1", "2d", "in", "59m"]
    assert row(output, "example.net") == ["example.net", "up", "1d", "1", "0", "2m", "due"]
    assert row(output, "example.org") == ["example.org", "unknown", "-", "0", "0", "-", "-"]
    # The DSN's destination is not a backed-up domain: marked, and explained.
    assert row(output, "sender.test")[:2] == ["sender.test", "*"]
    assert "not backed up here" in output

    chart = output.split("QUEUE AGE", 1)[1].splitlines()[1:]
    counts = {line[2:8].strip(): int(line.split()[-1]) for line in chart}
    assert counts == {"< 5m": 2, "5m-1h": 1, "1h-4h": 1, "4h-1d": 0, "1d-5d": 1, "> 5d": 0}
    assert len(output.splitlines()) <= 28, "one screen"


def test_status_json_has_the_same_facts(populated: Populated) -> None:
    facts = json.loads(populated.run("status", "--json", check=False).stdout)
    assert facts["ok"] is False and facts["server"] is None
    assert facts["control_socket"] == str(populated.database.with_suffix(".sock"))
    assert [(p["kind"], p["severity"]) for p in facts["problems"]] == [
        ("server_not_running", "error"),
        ("primary_down", "warning"),
    ]
    assert facts["listen"] == ["127.0.0.1:2525"]
    assert facts["queue"]["recipients"]["held"] == 1
    domains = {d["domain"]: d for d in facts["domains"]}
    assert domains["example.com"]["state"] == "down"
    assert domains["example.com"]["queued"] == 3 and domains["example.com"]["held"] == 1
    assert domains["example.org"]["next_probe_at"] is None
    assert domains["sender.test"]["backed_up"] is False
    assert [h["messages"] for h in facts["age_histogram"]] == [2, 1, 1, 0, 1, 0]
    # The queue file and its WAL while the command had them open (the WAL is folded
    # into the file when the last connection closes), and the disk beside them.
    assert facts["database_bytes"] >= populated.database.stat().st_size > 0
    disk = os.statvfs(populated.database)
    assert 0 < facts["filesystem_free_bytes"] <= disk.f_blocks * disk.f_frsize


# --------------------------------------------------------------------------- health check


def health(server: ServerProcess) -> tuple[int, dict[str, Any]]:
    """`status --json` of a real server: its exit status and its facts."""
    result = server.cli("status", "--json", check=False)
    return result.returncode, json.loads(result.stdout)


def answers(server: ServerProcess) -> dict[str, Any]:
    """The facts once `status` exits 0 (the server says "running" once all is bound)."""

    def healthy() -> dict[str, Any] | None:
        code, facts = health(server)
        return facts if code == 0 else None

    return wait_for(healthy, 15, "status to exit 0")


def not_running(server: ServerProcess) -> list[str]:
    result = server.cli("status", check=False)
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    return result.stdout.splitlines()


def test_status_exits_0_while_serve_runs_without_any_metrics_port(server_factory: Any) -> None:
    server = server_factory(metrics={"listen": ""}).start()
    facts = answers(server)
    assert facts["ok"] is True and facts["problems"] == []
    report = facts["server"]
    assert report["pid"] == server.process.pid  # type: ignore[union-attr]
    assert (report["state"], report["accepting"], report["fence_up"]) == ("running", True, True)
    assert report["store"] == {"reachable": True, "error": None}
    assert report["listen"] == [f"127.0.0.1:{server.port}"] and report["metrics"] is None
    assert report["node"].endswith(":mx2.backup.test") and report["version"]
    output = server.cli("status").stdout
    assert re.search(
        r"^server     running, healthy \(pid \d+, up \d+s\); version \S+, node \S+$", output, re.M
    ), output
    assert output.startswith("backupmx on mx2.backup.test"), "no problem line"
    socket = server.directory / "queue.sock"
    assert stat.S_IMODE(socket.stat().st_mode) == 0o660
    assert server.stop() == 0
    assert not socket.exists(), "removed at a clean stop"
    assert not_running(server)[0] == (
        f"error: server not running (no answer on control socket {socket})"
    )
    facts = health(server)[1]
    assert facts["ok"] is False and facts["server"] is None
    assert facts["queue"]["messages"] == 0, "the queue is shown all the same"


def test_after_sigkill_status_fails_and_the_next_serve_replaces_the_stale_socket(
    server_factory: Any,
) -> None:
    server = server_factory().start()
    answers(server)
    server.kill()
    socket = server.directory / "queue.sock"
    assert socket.exists(), "a crash leaves the socket file behind"
    assert not_running(server)[0] == (
        f"error: server not running (no answer on control socket {socket})"
    )
    server.start()
    assert answers(server)["server"]["pid"] == server.process.pid  # type: ignore[union-attr]
    assert server.stop() == 0


def test_a_stopped_process_is_not_answering_within_3_seconds(server_factory: Any) -> None:
    server = server_factory().start()
    answers(server)
    server.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        lines = not_running(server)
        took = time.monotonic() - started
    finally:
        server.signal(signal.SIGCONT)
    assert lines[0] == (
        f"error: server not answering ({server.directory / 'queue.sock'}: no answer within 3s)"
    )
    assert 3 <= took < 20
    server.kill()  # a SIGTERM just after SIGCONT hangs today, with or without status


def serve(server: ServerProcess) -> subprocess.CompletedProcess[str]:
    """`backupmx serve` expected to refuse to start: run to its end, output captured."""
    server.write_config()
    return subprocess.run(
        [sys.executable, "-m", "backupmx", "--config", str(server.config_path), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=server.directory,
    )


def test_a_second_serve_on_the_same_control_socket_refuses_to_start(server_factory: Any) -> None:
    first = server_factory().start()
    socket = first.directory / "queue.sock"
    second = serve(server_factory(control_socket=str(socket)))
    assert second.returncode == 1
    assert second.stderr.splitlines() == [
        f"backupmx: cannot start: control_socket: {socket}: another backupmx serve is running"
        " (it answers on this control socket)"
    ]
    assert answers(first)["server"]["pid"] == first.process.pid  # type: ignore[union-attr]
    assert first.stop() == 0


def test_status_piped_into_head_ends_without_a_traceback(server_factory: Any) -> None:
    # A row per domain: more than a pipe holds, so the pipe closes under the writer.
    domains = [{"name": f"d{i}.example.test"} for i in range(2000)]
    server = server_factory(domain=domains).start()
    answers(server)
    command = [sys.executable, "-m", "backupmx", "--config", str(server.config_path), "status"]
    result = subprocess.run(
        shlex.join(command) + " | head -1", shell=True, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.startswith("backupmx on mx2.backup.test")
    assert result.stderr == ""
    assert server.stop() == 0


# --------------------------------------------------------------------------- domains, queue list


def test_domains_shows_each_primary_and_what_waits_for_it(populated: Populated) -> None:
    output = populated.run("domains").stdout
    down = row(output, "example.com")
    assert down[1:6] == ["down", "3h", "3", "1", "2d"]
    assert "Connection refused" in output
    assert row(output, "example.net")[1:5] == ["up", "1d", "1", "0"]


def test_queue_list_oldest_first_with_recipients_and_states(populated: Populated) -> None:
    output = populated.run("queue", "list").stdout
    ids = populated.ids
    order = [ids[name] for name in ("spam", "outage", "held", "fresh", "dsn")]
    positions = [output.index(queue_id) for queue_id in order]
    assert positions == sorted(positions)
    assert row(output, ids["spam"])[1:5] == [
        "2d",
        str(len(BODY)),
        "spammer@bad.test",
        "a@example.com",
    ]
    assert row(output, ids["held"])[-2:] == ["held", "0"]
    assert row(output, ids["dsn"])[3] == "<>"
    assert "c@example.com" in output
    assert output.rstrip().endswith("-- 5 message(s), 6 recipient(s)")


def test_queue_list_filters(populated: Populated) -> None:
    ids = populated.ids
    assert populated.listed("--state", "held") == [ids["held"]]
    assert populated.listed("--sender", "SPAMMER@bad.test") == [ids["spam"]]
    assert populated.listed("--sender", "*@sender.test") == [
        ids["outage"],
        ids["held"],
        ids["fresh"],
    ]
    assert populated.listed("--sender", "<>") == [ids["dsn"]]
    assert populated.listed("--recipient", "c@*") == [ids["outage"]]
    assert populated.listed("--older-than", "2h") == [ids["spam"], ids["outage"]]
    assert populated.listed("--older-than", "1d", "--domain", "example.com") == [ids["spam"]]
    assert populated.listed("--domain", "example.net") == [ids["fresh"]]
    assert populated.listed("--state", "delivered") == []
    bad = populated.run("queue", "list", "--older-than", "soon", check=False)
    assert bad.returncode == 2 and "not a duration" in bad.stderr


def test_queue_export_writes_the_stored_message_byte_for_byte(populated: Populated) -> None:
    exported = subprocess.run(
        [sys.executable, "-m", "backupmx", "--config", str(populated.config), "queue", "export",
         populated.ids["outage"]],
        capture_output=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert exported == BODY
    as_json = json.loads(populated.run("queue", "export", populated.ids["outage"], "--json").stdout)
    assert as_json["sender"] == "alice@sender.test"
    assert [r["address"] for r in as_json["recipients"]] == ["b@example.com", "c@example.com"]


def test_bulk_delete_counts_first_and_acts_only_with_yes(populated: Populated) -> None:
    dry = populated.run("queue", "delete", "--sender", "spammer@bad.test")
    assert "would act on 1 recipient(s) of 1 message(s)" in dry.stdout and "--yes" in dry.stdout
    assert populated.ids["spam"] in populated.listed()
    dry_json = json.loads(
        populated.run("queue", "delete", "--domain", "example.com", "--json").stdout
    )
    assert dry_json == {
        "action": "delete",
        "dry_run": True,
        "messages": 3,
        "recipients": 4,
        "ids": [populated.ids[n] for n in ("spam", "outage", "held")],
    }

    done = json.loads(
        populated.run("queue", "delete", "--sender", "spammer@bad.test", "--yes", "--json").stdout
    )
    assert done == {
        "action": "delete",
        "dry_run": False,
        "messages": 1,
        "recipients": 1,
        "changed": 1,  # messages deleted with their last recipient
        "removed": 1,
        "unknown": [],
        "in_flight": [],
    }
    assert populated.ids["spam"] not in populated.listed()
    assert len(populated.listed()) == 4


def test_requeue_and_bulk_hold_release(populated: Populated) -> None:
    ids = populated.ids
    assert (
        "requeue: 1 recipient(s) of 1 message(s)"
        in populated.run("queue", "requeue", ids["held"]).stdout
    )
    assert populated.listed("--state", "held") == []
    held = populated.run("queue", "hold", "--older-than", "1h", "--yes").stdout
    assert held.strip() == "hold: 3 recipient(s) of 2 message(s)"
    assert populated.listed("--state", "held") == [ids["spam"], ids["outage"]]
    released = json.loads(
        populated.run("queue", "release", "--state", "held", "--yes", "--json").stdout
    )
    assert released["changed"] == 3


def test_filters_narrow_within_ids_and_an_action_needs_one_or_the_other(
    populated: Populated,
) -> None:
    ids = populated.ids
    both = populated.run("queue", "hold", ids["spam"], ids["fresh"], "--domain", "example.com")
    assert both.stdout.strip() == "hold: 1 recipient(s) of 1 message(s)"  # at once: IDs given
    assert populated.listed("--state", "held") == [ids["spam"], ids["held"]]
    neither = populated.run("queue", "delete", check=False)
    assert neither.returncode == 2 and "needs IDs" in neither.stderr


# --------------------------------------------------------------------------- exit codes


def test_missing_config_file_exits_2_naming_it(tmp_path: Path) -> None:
    result = backupmx(tmp_path / "nope.toml", "status")
    assert result.returncode == 2
    assert f"cannot read {tmp_path / 'nope.toml'}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("verb", [("status",), ("domains",), ("queue", "list")])
def test_postgresql_down_says_database_unreachable_and_exits_1(
    tmp_path: Path, verb: tuple[str, ...]
) -> None:
    url = f"postgresql://backupmx:secret@127.0.0.1:{free_port()}/backupmx"  # nothing listens
    config = write_config(tmp_path / "backupmx.toml", {"database": url})
    result = backupmx(config, *verb)
    assert result.returncode == 1
    if verb == ("status",):  # a problem line of its own, beside the server's
        assert "\nerror: database unreachable: postgresql" in result.stdout
    else:
        assert result.stderr.startswith("backupmx: database unreachable: postgresql")
    assert "secret" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_a_missing_sqlite_queue_is_unreachable_not_silently_created(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "backupmx.toml", {"database": f"sqlite:///{tmp_path / 'typo.db'}"}
    )
    result = backupmx(config, "status")
    assert result.returncode == 1
    assert "database unreachable" in result.stdout and "db upgrade" in result.stdout
    assert not (tmp_path / "typo.db").exists()


def test_status_on_an_old_schema_says_run_db_upgrade(tmp_path: Path) -> None:
    (tmp_path / "empty.db").touch()
    config = write_config(
        tmp_path / "backupmx.toml", {"database": f"sqlite:///{tmp_path / 'empty.db'}"}
    )
    result = backupmx(config, "status")
    assert result.returncode == 1
    assert "run `backupmx db upgrade`" in result.stdout


def test_status_knows_what_the_quick_start_flags_serve(tmp_path: Path) -> None:
    """`serve --primary D=H --listen A` with no [[domain]] in the file: `status`, run
    without those flags, takes the server's own domains and addresses from its answer."""
    server = ServerProcess(tmp_path, domain=[])
    server.start(
        "serve", "--primary", "quick.test=127.0.0.1:9", "--listen", server.settings["listen"][0]
    )
    try:
        database = server.settings["database"]
        shown = subprocess.run(
            [sys.executable, "-m", "backupmx", "status", "--json", "--database", database],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env={k: v for k, v in os.environ.items() if k != "BACKUPMX_CONFIG"},
        )
        assert shown.returncode == 0, shown.stdout + shown.stderr
        facts = json.loads(shown.stdout)
        assert facts["listen"] == server.settings["listen"]
        assert facts["server"]["domains"] == ["quick.test"]
        (domain,) = [d for d in facts["domains"] if d["domain"] == "quick.test"]
        assert domain["backed_up"] is True
    finally:
        server.stop()
