"""Outbound STARTTLS: opportunistic by default, verified with ``tls = "verify"``.

The primary is a second real `backupmx serve` with a STARTTLS certificate made
by trustme (smtp-sink has no TLS); what it receives is read from its own queue,
whose Received: header names the protocol (ESMTPS) and the TLS version.
"""

from __future__ import annotations

import smtplib
from pathlib import Path
from typing import Any

import trustme

from tests.support.server import ServerProcess
from tests.support.waiting import wait_for, wait_for_state


def make_primary(server_factory: Any, tmp_path: Path, ca: trustme.CA) -> ServerProcess:
    cert = ca.issue_cert("127.0.0.1", "primary.example.test")
    cert_path, key_path = tmp_path / "primary-cert.pem", tmp_path / "primary-key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    primary: ServerProcess = server_factory(
        hostname="primary.example.test",
        tls={"cert": str(cert_path), "key": str(key_path)},
    )
    return primary.start()


def make_backup(server_factory: Any, primary: ServerProcess, **domain: Any) -> ServerProcess:
    backup: ServerProcess = server_factory(
        delivery={"probe_interval": "1s", "retry_min": "1s", "retry_max": "2s"},
        domain=[{"name": "example.test", "primary": [f"127.0.0.1:{primary.port}"], **domain}],
    )
    return backup.start()


def send(server: ServerProcess) -> None:
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.sendmail("alice@sender.test", ["bob@example.test"], b"Subject: tls\r\n\r\nhi\r\n")


def test_opportunistic_tls_encrypts_even_with_an_unknown_certificate(
    server_factory: Any, tmp_path: Path
) -> None:
    primary = make_primary(server_factory, tmp_path, trustme.CA())
    backup = make_backup(server_factory, primary)
    send(backup)
    wait_for_state(backup, "delivered")
    (received,) = primary.queue()
    relayed = primary.raw(received["id"])
    assert b"with ESMTPS" in relayed.split(b"\r\n\tby ")[1]
    assert b"(using TLSv1." in relayed


def test_verify_delivers_to_a_primary_with_a_trusted_certificate(
    server_factory: Any, tmp_path: Path
) -> None:
    ca = trustme.CA()
    primary = make_primary(server_factory, tmp_path, ca)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    backup = make_backup(server_factory, primary, tls="verify")
    backup.settings["delivery"]["ca_file"] = str(ca_file)
    backup.stop()
    backup.start()
    send(backup)
    wait_for_state(backup, "delivered")
    assert len(primary.queue()) == 1


def test_verify_defers_when_the_certificate_is_not_trusted(
    server_factory: Any, tmp_path: Path
) -> None:
    primary = make_primary(server_factory, tmp_path, trustme.CA())
    backup = make_backup(server_factory, primary, tls="verify")
    send(backup)

    def tried() -> dict[str, Any] | None:
        (message,) = backup.queue()
        found: dict[str, Any] = message["recipients"][0]
        return found if found["attempts"] >= 1 and found["last_error"] else None

    recipient = wait_for(tried, 15, "a failed delivery attempt", interval=0.3)
    assert recipient["state"] == "queued"
    assert (
        "certificate" in recipient["last_error"].lower() or "tls" in recipient["last_error"].lower()
    )
    assert primary.queue() == []
