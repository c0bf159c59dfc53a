"""Pacing a primary that comes back: a 421 halves the host's connection window, and
successes grow it again one connection at a time (qmgr_feedback's ramp), never a stampede.

Real programs: Postfix's smtp-sink as the primary (``-Q MAIL``: 421 and disconnect), then
a normal smtp-sink on the same port; the window is read from backupmx's ``pacer_window``
log events.
"""

from __future__ import annotations

import json
import smtplib
from typing import Any

from tests.support.ports import free_port
from tests.support.primary_sink import SmtpSink
from tests.support.server import ServerProcess
from tests.support.waiting import wait_for

PRIMARY = "127.0.0.2"


def windows(server: ServerProcess) -> list[tuple[int, int]]:
    events = [json.loads(line) for line in server.log().splitlines() if '"pacer_window"' in line]
    return [(e["was"], e["connections"]) for e in events]


def pending(server: ServerProcess) -> int:
    return sum(r["state"] in ("queued", "sending") for m in server.queue() for r in m["recipients"])


def test_421_halves_the_window_and_successes_ramp_it_back_up_one_at_a_time(
    server_factory: Any,
) -> None:
    port = free_port(PRIMARY)
    server: ServerProcess = server_factory(
        delivery={
            "probe_interval": "1s",
            "retry_min": "1s",
            "retry_max": "1s",
            "initial_connections_per_host": 8,
            "max_connections_per_host": 20,
            "max_messages_per_second_per_host": 0,
        },
        domain=[{"name": "example.test", "primary": [f"{PRIMARY}:{port}"]}],
    ).start()
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        for i in range(60):
            client.sendmail("a@sender.test", [f"r{i}@example.test"], b"Subject: x\r\n\r\nx\r\n")
    refusing = SmtpSink(PRIMARY, port, "-Q", "MAIL").start()
    try:
        wait_for(
            lambda: any(now == 1 for _, now in windows(server)),
            20,
            "a 421 to shrink the window to one connection",
            interval=0.2,
        )
    finally:
        refusing.close()
    shrinking = windows(server)
    assert shrinking, "no pacer_window event: a 421 did not change the window"
    assert all(now == max(was // 2, 1) for was, now in shrinking), shrinking
    assert shrinking[-1][1] == 1
    accepting = SmtpSink(PRIMARY, port).start()
    try:
        wait_for(lambda: pending(server) == 0, 40, "every recipient delivered", interval=0.3)
    finally:
        accepting.close()
    growing = windows(server)[len(shrinking) :]
    assert growing, "successes did not grow the window"
    assert all(now == was + 1 for was, now in growing), growing
    assert max(now for _, now in growing) < 20
