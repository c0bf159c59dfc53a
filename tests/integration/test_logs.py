"""Log output: one JSON record per line, also when two processes share stdout.

`backupmx serve` and its intake process write to the same stdout (a journald
stream, a pipe, a file).  Run unbuffered (PYTHONUNBUFFERED, usual under systemd
and in containers), every record must still reach it whole, in one write with its
newline, and no longer than a pipe keeps whole (docs/contracts.md#logs).  Delivery
is logged per message, with a line of its own only for a recipient whose outcome
differs.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import smtplib
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support.ports import free_port
from tests.support.primary_sink import PickyPrimary
from tests.support.server import DOMAIN, ServerProcess
from tests.support.waiting import wait_for

WRITER = """
import structlog
from backupmx import logs
logs.configure("info")
log = structlog.get_logger()
for n in range(2000):
    log.info("tick", n=n, pad="x" * 50)
"""

SESSIONS = 16
MESSAGES = 320  # 20 per session
CROWD = 1000  # the recipients of the one message every retry of which is deferred
# A primary's deferral, longer than a pipe keeps whole (PIPE_BUF): its line is the
# one another process's line could land in.
LONG_DEFERRAL = "450 4.2.0 mailbox busy, " + "try again later " * 300  # < smtplib's 8192
CROWD_DEFERRAL = "451 4.3.0 try again later"
LONG_HEADER = "X-Long: " + "v" * 900  # within RFC 5322's 998, far beyond the usual


def recipients(n: int) -> list[str]:
    """Message `n` goes to two who take it and one whose mailbox is busy; one more, of a
    domain not backed up, is refused at RCPT: ``serve`` logs it while the intake logs
    the messages it commits."""
    return [f"a{n}@{DOMAIN}", f"b{n}@{DOMAIN}", f"busy{n}@{DOMAIN}", f"c{n}@elsewhere.test"]


def crowd() -> list[str]:
    return [f"crowd{n}@{DOMAIN}" for n in range(CROWD)]


def refusals() -> dict[str, str]:
    busy = {recipients(n)[2]: LONG_DEFERRAL for n in range(MESSAGES)}
    return busy | {address: CROWD_DEFERRAL for address in crowd()}


def message(n: int) -> str:
    return f"Subject: load {n}\r\n{LONG_HEADER}\r\n\r\nmessage {n}\r\n"


def send(server: ServerProcess, numbers: range) -> int:
    """One SMTP session sending messages `numbers` (null sender: no DSN); the count sent."""
    with smtplib.SMTP(server.host, server.port, timeout=30) as client:
        for n in numbers:
            client.sendmail("", recipients(n), message(n))
    return len(numbers)


def delivered(parsed: list[dict[str, Any]]) -> int:
    """The recipients the delivery events count as delivered."""
    return sum(r.get("recipients", 1) for r in parsed if r["event"].endswith("_delivered"))


def crowd_tried(parsed: list[dict[str, Any]]) -> int:
    """The deferrals of the crowd's recipients the delivery events count."""
    return sum(r.get("recipients", 1) for r in parsed if r.get("reply") == CROWD_DEFERRAL)


def records(log: bytes) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Every line of `log` as a JSON object with ``event``, and the lines that are not."""
    parsed, broken = [], []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and "event" in record:
            parsed.append(record)
        else:
            broken.append(line)
    return parsed, broken


@pytest.mark.parametrize("output", ["pipe", "file"])
def test_serve_and_its_intake_under_load_write_every_record_as_one_json_line(
    server_factory: Any, monkeypatch: pytest.MonkeyPatch, output: str
) -> None:
    """16 sessions send 320 messages (a long header each) while the deliverer logs the
    primary's answers, a 4 KiB deferral among them; then one message to 1,000
    recipients, all deferred.  Every line of the output is a whole JSON record."""
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    port = free_port()
    primary = PickyPrimary("127.0.0.1", port, refusals()).start()
    server = server_factory(
        domain=[{"name": DOMAIN, "primary": [f"127.0.0.1:{port}"]}],
        delivery={"retry_min": "1s", "retry_max": "2s"},
        limits={"max_errors": 1000},  # a refused RCPT in every message
    )
    try:
        server.start(pipe=output == "pipe")
        if output == "pipe":  # one page: a long record waits for the reader part-way
            assert server.process is not None and server.process.stdout is not None
            fcntl.fcntl(server.process.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
        started = time.monotonic()
        share = MESSAGES // SESSIONS
        with ThreadPoolExecutor(SESSIONS) as pool:
            shares = [range(s * share, (s + 1) * share) for s in range(SESSIONS)]
            assert sum(pool.map(lambda numbers: send(server, numbers), shares)) == MESSAGES
        with smtplib.SMTP(server.host, server.port, timeout=60) as client:
            client.sendmail("", crowd(), message(MESSAGES))
        sent = time.monotonic() - started

        def done() -> bool:
            parsed, _ = records(server.log_path.read_bytes())
            return delivered(parsed) >= 2 * MESSAGES and crowd_tried(parsed) >= CROWD

        wait_for(done, 60, "every message delivered and every one of the crowd tried")
        time.sleep(2)  # a retry or two more of the deferred, while the intake is idle
    finally:
        server.stop()
        primary.stop()
    time.sleep(0.2)  # the pipe's copier writes the last chunk
    log = server.log_path.read_bytes()
    parsed, broken = records(log)
    events = Counter(record["event"] for record in parsed)
    longest = max(len(line) + 1 for line in log.splitlines())
    print(
        f"\n{output}: {MESSAGES} messages over {SESSIONS} sessions in {sent:.1f} s; "
        f"{len(parsed)} records, {len(broken)} broken, longest {longest} bytes; "
        f"{dict(events.most_common(6))}"
    )
    assert not broken, broken[:3]
    assert longest <= select.PIPE_BUF
    assert events["message_accepted"] == MESSAGES + 1
    assert events["recipient_rejected"] == MESSAGES
    assert delivered(parsed) == 2 * MESSAGES
    crowd_lines = [r for r in parsed if r.get("reply") == CROWD_DEFERRAL]
    print(
        f"the crowd: {crowd_tried(parsed)} deferrals of its {CROWD} recipients in "
        f"{len(crowd_lines)} lines: {[r['recipients'] for r in crowd_lines]}"
    )
    assert {r["event"] for r in crowd_lines} == {"message_deferred"}
    assert crowd_tried(parsed) >= 10 * len(crowd_lines)  # a line per recipient before


def test_records_of_two_unbuffered_processes_never_share_a_line(tmp_path: Path) -> None:
    path = tmp_path / "serve.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with path.open("ab") as out:
        writers = [
            subprocess.Popen([sys.executable, "-c", WRITER], stdout=out, env=env) for _ in range(2)
        ]
        for writer in writers:
            assert writer.wait(timeout=60) == 0
    lines = path.read_bytes().splitlines()
    assert len(lines) == 4000
    broken = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            broken.append(line)
    assert not broken, broken[:3]
