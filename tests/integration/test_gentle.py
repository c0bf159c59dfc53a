"""A flush into a primary that limits its sessions: the pacer learns the limit.

Real programs: ``backupmx serve`` holding mail while its primary is down, then a
primary that takes 3 concurrent sessions and greets a fourth with ``421 4.7.0 Too
busy`` (`LimitedPrimary`, the one ``bench/gentle.py`` measures against).  The window
finds the limit with one refusal and then tries above it only now and then; the
refusals never mark the domain down, and every message is delivered once.
"""

from __future__ import annotations

import json
import smtplib
import time
from typing import Any

from tests.support.limited_primary import LimitedPrimary
from tests.support.ports import free_port
from tests.support.server import ServerProcess
from tests.support.waiting import wait_for

PRIMARY = "127.0.0.3"
SESSIONS = 3
PER_MESSAGE = 0.03
MESSAGES = 300  # 3 s for the primary at its 3 sessions


def events(server: ServerProcess, *names: str) -> list[dict[str, Any]]:
    lines = (line for line in server.log().splitlines() if line.startswith("{"))
    return [e for e in map(json.loads, lines) if e.get("event") in names]


def pending(server: ServerProcess) -> int:
    return sum(r["state"] in ("queued", "sending") for m in server.queue() for r in m["recipients"])


def test_a_primary_at_its_session_limit_is_refused_rarely_and_never_marked_down(
    server_factory: Any,
) -> None:
    port = free_port(PRIMARY)
    server: ServerProcess = server_factory(
        delivery={"probe_interval": "1s", "max_messages_per_second_per_host": 0},
        domain=[{"name": "example.test", "primary": [f"{PRIMARY}:{port}"]}],
    ).start()
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        for i in range(MESSAGES):
            client.sendmail("a@sender.test", [f"r{i}@example.test"], b"Subject: x\r\n\r\nx\r\n")
    wait_for(lambda: events(server, "primary_down"), 10, "the primary seen down", interval=0.2)
    before = len(events(server, "primary_up", "primary_down"))

    primary = LimitedPrimary(PRIMARY, port, SESSIONS, PER_MESSAGE)
    started = primary.start()
    try:
        wait_for(lambda: pending(server) == 0, 40, "every message delivered", interval=0.3)
        drained = time.monotonic() - started
    finally:
        primary.stop()
    seen = primary.snapshot()
    flips = [e["event"] for e in events(server, "primary_up", "primary_down")[before:]]
    print(
        f"{MESSAGES} messages in {drained:.1f} s: {len(seen.refusals)} refusals, "
        f"peak {seen.peak} sessions, {seen.sessions} sessions, state changes {flips}"
    )
    assert len(seen.messages) == MESSAGES  # each once: a refusal defers nothing for long
    assert seen.peak == SESSIONS
    assert flips == ["primary_up"]
    # Today's window (halve, then grow back by 1/window per success) was refused every
    # few dozen messages; this one once to find the limit, then once per probe upwards
    # (5 s, then 10 s later).
    assert len(seen.refusals) <= 3, seen.refusals
    windows = events(server, "pacer_window")
    assert windows[-1]["ceiling"] == SESSIONS + 1, windows[-1]
