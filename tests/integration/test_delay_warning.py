"""Delay warnings (``delivery.delay_warning``): one "delayed" DSN per recipient, never more."""

from __future__ import annotations

import smtplib
import time
from typing import Any

from tests.support.server import DOMAIN, ServerProcess
from tests.support.waiting import wait_for


def dsns(server: ServerProcess) -> list[dict[str, Any]]:
    return [m for m in server.queue() if m["sender"] == ""]


def test_a_late_recipient_gets_one_delay_warning_and_no_second(server_factory: Any) -> None:
    server: ServerProcess = server_factory(
        delivery={"delay_warning": "1s", "probe_interval": "1h"},
        # The sender's domain has a dead primary too, so that the warning stays queued
        # for the test to read (a delivered or bounced message's body leaves the queue).
        domain=[
            {"name": DOMAIN, "primary": ["127.0.0.1:9"]},
            {"name": "sender.test", "primary": ["127.0.0.1:9"]},
        ],
    ).start()
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.sendmail(
            "alice@sender.test",
            ["late@example.test", "never@example.test"],
            b"Subject: slow\r\n\r\nstill waiting\r\n",
            rcpt_options=[],
        )
    time.sleep(1.5)
    server.stop()
    server.start()  # housekeeping runs at start-up, then every minute
    wait_for(lambda: dsns(server), 15, "a delay warning DSN in the queue", interval=0.3)
    (notice,) = dsns(server)
    assert [r["address"] for r in notice["recipients"]] == ["alice@sender.test"]
    body = server.raw(notice["id"])
    assert b"Action: delayed" in body
    assert b"Final-Recipient: rfc822; late@example.test" in body
    assert b"Will-Retry-Until:" in body
    (original,) = [m for m in server.queue() if m["sender"] == "alice@sender.test"]
    assert {r["state"] for r in original["recipients"]} == {"queued"}
    server.stop()
    server.start()
    time.sleep(3)
    assert len(dsns(server)) == 1
