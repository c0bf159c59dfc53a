"""What the primary supports is passed through: DSN parameters (RET, ENVID, NOTIFY, ORCPT)
with their case, BODY=8BITMIME and SMTPUTF8.  The primary is a second real
`backupmx serve` (it advertises DSN, 8BITMIME and SMTPUTF8), so what arrived is read
from its queue."""

from __future__ import annotations

import smtplib
from typing import Any

from tests.support.server import ServerProcess
from tests.support.waiting import wait_for


def pair(server_factory: Any) -> tuple[ServerProcess, ServerProcess]:
    primary: ServerProcess = server_factory(hostname="primary.example.test").start()
    backup: ServerProcess = server_factory(
        delivery={"probe_interval": "1s"},
        domain=[{"name": "example.test", "primary": [f"127.0.0.1:{primary.port}"]}],
    ).start()
    return primary, backup


def arrived(primary: ServerProcess, timeout: float = 15) -> dict[str, Any]:
    """The one message the primary has, once something reached it."""
    (message,) = wait_for(primary.queue, timeout, "mail at the primary", interval=0.3)
    return message


def test_dsn_parameters_reach_a_primary_that_supports_dsn_unchanged(server_factory: Any) -> None:
    primary, backup = pair(server_factory)
    with smtplib.SMTP(backup.host, backup.port, timeout=10) as client:
        client.ehlo("client.test")
        client.sendmail(
            "alice@sender.test",
            ["bob@example.test"],
            b"Subject: dsn\r\n\r\n8-bit: \xc3\xa9t\xc3\xa9\r\n",
            mail_options=["RET=HDRS", "ENVID=QQ314159", "BODY=8BITMIME"],
            rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob@Example.test"],
        )
    message = arrived(primary)
    assert (message["ret"], message["envid"], message["body_type"]) == (
        "HDRS",
        "QQ314159",
        "8BITMIME",
    )
    (recipient,) = message["recipients"]
    assert recipient["notify"] == "SUCCESS,FAILURE"
    assert recipient["orcpt"] == "rfc822;Bob@Example.test"
    assert primary.raw(message["id"]).endswith(b"8-bit: \xc3\xa9t\xc3\xa9\r\n")


def test_smtputf8_mail_is_relayed_with_smtputf8(server_factory: Any) -> None:
    primary, backup = pair(server_factory)
    with smtplib.SMTP(backup.host, backup.port, timeout=10) as client:
        client.ehlo("client.test")
        client.sendmail(
            "jörg@sender.test",
            ["bob@example.test"],
            "Subject: utf8\r\n\r\nGrüße\r\n".encode(),
            mail_options=["SMTPUTF8"],
        )
    message = arrived(primary)
    assert message["sender"] == "jörg@sender.test"
    assert message["smtputf8"] is True
    assert message["protocol"] == "UTF8SMTP"
