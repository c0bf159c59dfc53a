"""The smallest end-to-end path: smtplib sends, `queue list --json` shows it held."""

from __future__ import annotations

import smtplib

from tests.support.server import DOMAIN, ServerProcess


def test_message_for_backed_up_domain_is_held(server: ServerProcess) -> None:
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.ehlo("client.test")
        refused = client.sendmail(
            "alice@sender.test", [f"bob@{DOMAIN}"], b"Subject: hi\r\n\r\nhello\r\n"
        )
    assert refused == {}
    (message,) = server.queue()
    assert message["sender"] == "alice@sender.test"
    assert [r["address"] for r in message["recipients"]] == [f"bob@{DOMAIN}"]
    assert message["recipients"][0]["state"] == "queued"
