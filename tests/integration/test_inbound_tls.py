"""Inbound STARTTLS: TLS 1.2 or newer, a certificate reloaded on SIGHUP, never required.

Specification (issue "Protect", RFC 3207): STARTTLS uses ``[tls] cert`` and
``key``; protocol versions below TLS 1.2 are refused; a SIGHUP loads a new
certificate for the next handshakes without dropping open sessions (in TLS or
not); a broken certificate on reload is refused and the old one kept; a client
that never says STARTTLS is served on port 25 as well (RFC 3207 §4); the TLS
version and cipher are in our ``Received:`` header.

Tested with the real swaks (``--tls``) and Python's ``ssl`` against certificates
made by trustme.
"""

from __future__ import annotations

import re
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support.server import DOMAIN, ServerProcess
from tests.support.smtp_client import RawClient, queue_id, serving, split_received, swaks
from tests.support.waiting import logged, wait_for_log

HOSTNAME = "mx2.backup.test"


def install(cert: trustme.LeafCert, directory: Path) -> dict[str, str]:
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_path))
    return {"cert": str(cert_path), "key": str(key_path)}


def der(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def client_context(ca: trustme.CA, **versions: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    for name, version in versions.items():
        setattr(context, name, version)
    return context


def tls_session(server: ServerProcess, context: ssl.SSLContext) -> RawClient:
    client = RawClient(server.host, server.port)
    client.command("EHLO tls-client.test")
    assert client.command("STARTTLS").startswith("220 2.0.0")
    client.start_tls(context, HOSTNAME)
    assert client.command("EHLO tls-client.test").code == 250
    return client


def message(client: RawClient, tag: str) -> str:
    reply = client.transaction(
        f"{tag}@sender.test", [f"bob@{DOMAIN}"], f"Subject: {tag}\r\n\r\nover TLS\r\n.\r\n".encode()
    )
    assert reply.code == 250, reply
    return queue_id(reply)


@pytest.fixture(scope="module")
def first_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory, first_ca: trustme.CA
) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("inbound-tls")
    tls = install(first_ca.issue_cert(HOSTNAME, "127.0.0.1"), directory)
    with serving(ServerProcess(directory, tls=tls)) as server:
        yield server


def test_swaks_tls_delivers_and_received_names_version_and_cipher(
    tls_server: ServerProcess,
) -> None:
    result = swaks(
        tls_server, "--tls", "--from", "swaks@sender.test", "--to", f"bob@{DOMAIN}",
        "--ehlo", "swaks.test", "--body", "over TLS",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TLS started with cipher TLSv1.3" in result.stdout, result.stdout
    qid = re.search(r"queued as ([0-9A-F]+)", result.stdout)
    assert qid is not None
    received, _ = split_received(tls_server.raw(qid.group(1)))
    assert re.search(rb"\(using TLSv1\.3 with cipher TLS_\w+ \(\d+/\d+ bits\)\)", received)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_1_2_is_accepted_and_older_versions_are_refused(
    tls_server: ServerProcess, first_ca: trustme.CA
) -> None:
    tls12 = client_context(first_ca, maximum_version=ssl.TLSVersion.TLSv1_2)
    with tls_session(tls_server, tls12) as client:
        assert client.sock.version() == "TLSv1.2"  # type: ignore[attr-defined]
        message(client, "tls12")
    old = client_context(
        first_ca,
        minimum_version=ssl.TLSVersion.TLSv1,
        maximum_version=ssl.TLSVersion.TLSv1_1,
    )
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.0/1.1 at all
    with RawClient(tls_server.host, tls_server.port) as client:
        client.command("EHLO old-client.test")
        assert client.command("STARTTLS").startswith("220 2.0.0")
        failed = len(logged(tls_server, "tls_failed"))
        with pytest.raises(ssl.SSLError, match=r"ALERT_PROTOCOL_VERSION|UNEXPECTED_EOF"):
            client.start_tls(old, HOSTNAME)
    wait_for_log(tls_server, "tls_failed", failed + 1)  # the server refused the handshake
    with tls_session(tls_server, client_context(first_ca)) as client:  # still serving
        assert client.sock.version() == "TLSv1.3"  # type: ignore[attr-defined]


def test_starttls_is_never_required(tls_server: ServerProcess) -> None:
    with RawClient(tls_server.host, tls_server.port) as client:
        assert "STARTTLS" in client.command("EHLO plain.test").extensions
        qid = message(client, "plain")
    (stored,) = [m for m in tls_server.queue() if m["id"] == qid]
    assert stored["tls"] is None


def test_sighup_loads_a_new_certificate_without_dropping_sessions(
    server_factory: Any, tmp_path: Path, first_ca: trustme.CA
) -> None:
    old_cert = first_ca.issue_cert(HOSTNAME, "127.0.0.1")
    server = server_factory(tls=install(old_cert, tmp_path)).start()
    old_context = client_context(first_ca)
    in_tls = tls_session(server, old_context)
    plain = RawClient(server.host, server.port)
    try:
        assert plain.command("EHLO waiting.test").code == 250
        assert in_tls.sock.getpeercert(binary_form=True) == der(old_cert)  # type: ignore[attr-defined]

        second_ca = trustme.CA()
        new_cert = second_ca.issue_cert(HOSTNAME, "127.0.0.1")
        install(new_cert, tmp_path)
        server.signal(signal.SIGHUP)
        wait_for_log(server, "reloaded", 1)

        message(in_tls, "kept-tls-session")  # the session in TLS goes on
        assert plain.command("STARTTLS").startswith("220 2.0.0")  # the open plain one too …
        plain.start_tls(client_context(second_ca), HOSTNAME)  # … with the new certificate
        assert plain.sock.getpeercert(binary_form=True) == der(new_cert)  # type: ignore[attr-defined]
        assert plain.command("EHLO waiting.test").code == 250
        message(plain, "after-reload")
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_session(server, old_context)  # new connections get the new certificate only

        # A broken file on reload is refused; the running certificate stays.
        Path(tmp_path / "key.pem").write_text("not a key\n")
        server.signal(signal.SIGHUP)
        wait_for_log(server, "reload_refused", 1)
        with tls_session(server, client_context(second_ca)) as client:
            assert client.sock.getpeercert(binary_form=True) == der(new_cert)  # type: ignore[attr-defined]
    finally:
        in_tls.close()
        plain.close()


def test_a_failed_handshake_frees_its_connection_slot_and_the_server_still_stops_cleanly(
    server_factory: Any, tmp_path: Path, first_ca: trustme.CA
) -> None:
    """asyncio reports no lost connection to the protocol above a TLS transport whose
    handshake failed; the session must end itself, or it holds a connection slot for
    good and SIGTERM's drain waits for it."""
    tls = install(first_ca.issue_cert(HOSTNAME, "127.0.0.1"), tmp_path)
    server = server_factory(tls=tls, limits={"max_connections_per_ip": 2}).start()
    for attempt in range(1, 5):
        client = RawClient(server.host, server.port)
        assert client.command("EHLO refused-cert.test").code == 250
        assert client.command("STARTTLS").startswith("220 2.0.0")
        with pytest.raises(ssl.SSLCertVerificationError):
            client.start_tls(client_context(trustme.CA()), HOSTNAME)  # not our CA
        client.close()
        wait_for_log(server, "tls_failed", attempt)
    with tls_session(server, client_context(first_ca)) as client:  # the slot is free again
        message(client, "after-failed-handshakes")
    assert server.stop(timeout=15) == 0
    assert "Traceback" not in server.log()
