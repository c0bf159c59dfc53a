"""Hostile clients: garbage, floods, slow-loris and connection hogs do not stop a real client.

Every test runs a real `backupmx serve`, attacks it over raw loopback sockets
and checks that a well-behaved smtplib client is still answered ``250`` and its
message queued — during the attack and after — and that the server's resident
memory stays bounded.  The limits exercised are the documented ones of
`backupmx.config.Limits`: ``max_errors`` (421 4.7.0 after 20 errors),
``max_recipients`` (452 4.5.3 past 1000), ``command_timeout`` (421 4.4.2) and
``max_connections_per_ip`` (421 4.7.0).
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import smtplib
import socket
import struct
import termios
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.support.server import DOMAIN, ServerProcess, server_examples
from tests.support.smtp_client import RawSession
from tests.support.waiting import wait_for, wait_for_success

RSS_LIMIT_MIB = 200
MAX_ERRORS = 20  # limits.max_errors default
MAX_RECIPIENTS = 1000  # limits.max_recipients default
QUEUED = re.compile(r"2\.0\.0 Ok: queued as ([0-9A-F]+)")
VERBS = {
    "HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT",
    "VRFY", "EXPN", "HELP", "STARTTLS",
}  # fmt: skip


def rss_mib(server: ServerProcess, field: str = "VmRSS") -> float:
    """The server's resident memory now (VmRSS) or at its peak so far (VmHWM)."""
    assert server.process is not None
    with open(f"/proc/{server.process.pid}/status") as file:
        status = file.read()
    match = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None
    return int(match.group(1)) / 1024


def send_well_behaved(
    server: ServerProcess, tag: str, source: str = "127.0.0.1", timeout: float = 15.0
) -> str:
    """smtplib sends one message; returns its queue id after checking the 250."""
    with smtplib.SMTP(
        server.host, server.port, timeout=timeout, source_address=(source, 0)
    ) as client:
        client.ehlo("good.client.test")
        assert client.mail(f"{tag}@sender.test")[0] == 250
        assert client.rcpt(f"{tag}@{DOMAIN}")[0] == 250
        code, reply = client.data(f"Subject: {tag}\r\n\r\nwell behaved\r\n".encode())
    match = QUEUED.search(reply.decode())
    assert code == 250 and match, f"well-behaved client got {code} {reply!r}"
    return match.group(1)


# --------------------------------------------------------------------------- garbage


def is_error_line(line: bytes) -> bool:
    """True unless the server would read `line` as one of its commands."""
    text = line.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
    return text.partition(" ")[0].upper() not in VERBS


hostile_line = (
    st.one_of(
        st.binary(max_size=300),
        st.binary(min_size=2049, max_size=5000),  # past the 2048-byte command line limit
        st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass")),
        st.sampled_from(sorted(VERBS)).flatmap(
            lambda v: st.binary(max_size=40).map(lambda b: v.encode() + b)
        ),
        st.integers(1, 200 * 1024).map(lambda n: b"Z" * n),
    )
    .map(lambda line: line.replace(b"\n", b"?"))
    .filter(is_error_line)
)

EXPLICIT = [
    b"A" * 100 * 1024,  # 100 KiB with no newline, then the newline
    b"\0" * 64,
    b"EHLO\0evil.test",
    b"MAIL\0FROM:<a@b>",
    bytes(range(256)).replace(b"\n", b""),
    b"",
    b"\r",
    b" ",
    b"X" * 2047,
    b"X" * (64 * 1024 + 1),
    b"\xff\xfe\xfd" * 1000,
    "ДАННЫЕ".encode(),
    b"\x1b[2J\x07",
    b"GET / HTTP/1.1",
    b"B" * 1024 * 1024,
    b"DATAX",
    b"\t\t",
    b"%s%n%x" * 10,
    b"\0",
    b"C" * 65535,
]


@server_examples(10)
@example(lines=EXPLICIT)
@given(lines=st.lists(hostile_line, min_size=MAX_ERRORS, max_size=MAX_ERRORS))
def test_garbage_lines_get_5xx_then_421_and_a_real_client_is_served(
    server: ServerProcess, lines: list[bytes]
) -> None:
    session = RawSession(server)
    try:
        assert session.reply().startswith("220 ")
        session.send(b"".join(line + b"\r\n" for line in lines))
        # While the garbage is being chewed on, a real client is served.
        send_well_behaved(server, "during-garbage")
        replies = [session.reply() for _ in lines]
        assert all(r.startswith("5") for r in replies), replies
        assert session.reply().startswith("421 4.7.0")
        assert session.closed_by_server()
    finally:
        session.close()
    send_well_behaved(server, "after-garbage")
    assert rss_mib(server) < RSS_LIMIT_MIB


def test_errors_past_the_limit_close_the_session_without_more_replies(
    server: ServerProcess,
) -> None:
    """A client that pipelines more errors than max_errors hears 421 4.7.0 and nothing else."""
    session = RawSession(server)
    try:
        assert session.reply().startswith("220 ")
        session.send(b"EHLO hostile.test\r\n")
        assert session.reply().startswith("250")
        # NOOPs after the errors would be answered 250 if the session went on.
        session.send(b"BOGUS\r\n" * MAX_ERRORS + b"NOOP\r\n" * 5)
        replies = [session.reply() for _ in range(MAX_ERRORS)]
        assert all(r.startswith("502 5.5.2") for r in replies), replies
        assert session.reply().startswith("421 4.7.0")
        try:
            extra = session.reply()
        except (EOFError, ConnectionResetError):
            extra = None
        assert extra is None, f"the closed session still answered {extra!r}"
    finally:
        session.close()
    send_well_behaved(server, "after-errors")


# --------------------------------------------------------------------------- RCPT flood


def test_ten_thousand_pipelined_rcpts_stop_at_max_recipients(server: ServerProcess) -> None:
    before = rss_mib(server)
    count = 10_000
    session = RawSession(server, timeout=60)
    try:
        assert session.reply().startswith("220 ")
        session.send(b"EHLO flood.test\r\n")
        assert "PIPELINING" in session.reply()
        flood = b"MAIL FROM:<flood@sender.test>\r\n" + b"".join(
            b"RCPT TO:<flood%d@%s>\r\n" % (i, DOMAIN.encode()) for i in range(count)
        )
        writer = threading.Thread(target=session.send, args=(flood,), daemon=True)
        writer.start()
        assert session.reply().startswith("250 2.1.0")

        good: list[float] = []

        def well_behaved() -> None:
            started = time.monotonic()
            send_well_behaved(server, "during-flood")
            good.append(time.monotonic() - started)

        helper = threading.Thread(target=well_behaved, daemon=True)
        replies: list[str] = []
        deadline = time.monotonic() + 60
        for i in range(count):
            replies.append(session.reply())
            if i == count // 4:
                helper.start()
            assert time.monotonic() < deadline, f"only {i} RCPT replies within 60 s"
        writer.join(10)
        helper.join(20)
        assert good and good[0] < 10, f"well-behaved client during the flood: {good}"
        assert all(r.startswith("250 2.1.5") for r in replies[:MAX_RECIPIENTS])
        assert all(r.startswith("452 4.5.3") for r in replies[MAX_RECIPIENTS:]), {
            r for r in replies[MAX_RECIPIENTS:] if not r.startswith("452 4.5.3")
        }

        session.send(b"DATA\r\n")
        assert session.reply().startswith("354")
        session.send(b"Subject: flood\r\n\r\nten thousand recipients asked\r\n.\r\n")
        final = session.reply()
        match = QUEUED.search(final)
        assert match, final
        session.send(b"QUIT\r\n")
        assert session.reply().startswith("221")
    finally:
        session.close()
    (message,) = [m for m in server.queue() if m["id"] == match.group(1)]
    assert [r["address"] for r in message["recipients"]] == [
        f"flood{i}@{DOMAIN}" for i in range(MAX_RECIPIENTS)
    ]
    send_well_behaved(server, "after-flood")
    after = rss_mib(server)
    print(f"\nRCPT flood: RSS {before:.1f} MiB before, {after:.1f} MiB after")
    assert after < RSS_LIMIT_MIB


# --------------------------------------------------------------------------- long lines


def body_of(kind: str, size: int) -> bytes:
    """A message of about `size` bytes whose lines end in CRLF, in bare LF, or one long line."""
    if kind == "crlf":
        return b"Subject: crlf\r\n\r\n" + (b"B" * 98 + b"\r\n") * (size // 100)
    if kind == "bare-lf":
        # Only <CRLF>.<CRLF> ends the data, so the last line ends with CRLF.
        return b"Subject: bare lf\n\n" + (b"B" * 99 + b"\n") * (size // 100) + b"\r\n"
    assert kind == "one-line"
    return b"Subject: one line\r\n\r\n" + b"A" * size + b"\r\n"


def send_body(server: ServerProcess, body: bytes) -> float:
    """Send `body` in one DATA over a raw session; return the seconds until the 250."""
    session = RawSession(server, timeout=120)
    try:
        assert session.reply().startswith("220 ")
        session.send(b"EHLO long.test\r\n")
        session.reply()
        session.send(
            b"MAIL FROM:<long@sender.test>\r\nRCPT TO:<long@%s>\r\nDATA\r\n" % DOMAIN.encode()
        )
        assert session.reply().startswith("250")
        assert session.reply().startswith("250")
        assert session.reply().startswith("354")
        started = time.monotonic()
        session.send(body + b".\r\n")
        final = session.reply()
        elapsed = time.monotonic() - started
        assert QUEUED.search(final), final
        session.send(b"QUIT\r\n")
        session.reply()
        return elapsed
    finally:
        session.close()


def test_bodies_without_crlf_are_decoded_in_linear_time(server: ServerProcess) -> None:
    """A body of bare-LF lines, or one long line, costs what a CRLF body of its size costs.

    No line-length limit applies in DATA (the backup must not refuse what the
    primary takes), so a client can send tens of MiB without a CRLF; rescanning
    everything buffered on every read would turn that into a CPU attack.
    """
    size = 30 * 1024 * 1024
    elapsed = {kind: send_body(server, body_of(kind, size)) for kind in KINDS}
    print("\n30 MiB bodies: " + ", ".join(f"{k} {v:.2f}s" for k, v in elapsed.items()))
    for kind in ("bare-lf", "one-line"):
        assert elapsed[kind] < 3 * elapsed["crlf"] + 1, elapsed
    send_well_behaved(server, "after-long-lines")


KINDS = ("crlf", "bare-lf", "one-line")


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes still in this socket's send queue (Linux SIOCOUTQ)."""
    (count,) = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))
    return int(count)


@pytest.mark.parametrize("kind", KINDS)
def test_bodies_in_flight_are_spooled_not_held_in_memory(server: ServerProcess, kind: str) -> None:
    """Sixteen clients in the middle of 12 MiB bodies cost disk pages, not resident memory.

    The bodies are sent up to (not including) the final CRLF.CRLF, so what is measured
    is the receiving path alone: nothing is committed or delivered yet.
    """
    clients, size = 16, 12 * 1024 * 1024
    body = body_of(kind, size)
    assert body.endswith(b"\r\n")
    body = body[:-2]  # the last line ends with the final dot's CRLF
    before = rss_mib(server)
    sessions = [RawSession(server, timeout=60) for _ in range(clients)]
    try:
        for session in sessions:
            assert session.reply().startswith("220 ")
            session.send(
                b"EHLO big.test\r\nMAIL FROM:<big@sender.test>\r\n"
                b"RCPT TO:<big@%s>\r\nDATA\r\n" % DOMAIN.encode()
            )
            replies = [session.reply() for _ in range(4)]
            assert replies[3].startswith("354"), replies
        senders = [threading.Thread(target=s.send, args=(body,), daemon=True) for s in sessions]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join(60)
        wait_for(
            lambda: not any(unsent_bytes(s.sock) for s in sessions),
            20,
            "the server to read every body sent (it stopped reading)",
            interval=0.05,
        )
        time.sleep(0.5)
        during = rss_mib(server)
        for session in sessions:
            session.send(b"\r\n.\r\n")
        for session in sessions:
            assert QUEUED.search(session.reply())
    finally:
        for session in sessions:
            session.close()
    in_flight = clients * len(body) / 2**20
    print(
        f"\n{clients} x {size >> 20} MiB {kind} bodies in flight ({in_flight:.0f} MiB):"
        f" RSS {before:.0f} MiB before, {during:.0f} MiB during"
    )
    assert during - before < in_flight / 4
    assert during < RSS_LIMIT_MIB
    send_well_behaved(server, "after-large-bodies")


# --------------------------------------------------------------------------- slow clients


@dataclass
class SlowClient:
    """One slow-loris connection, run in its own thread."""

    server: ServerProcess
    trickle: bool  # one byte a second, never a newline; else silent
    received: bytearray = field(default_factory=bytearray)
    closed_after: float | None = None  # seconds from connect to the server's close

    def run(self, limit: float) -> None:
        session = RawSession(self.server, timeout=1.0)
        started = time.monotonic()
        try:
            while time.monotonic() - started < limit:
                if self.trickle:
                    with contextlib.suppress(OSError):
                        session.sock.send(b"N")
                try:
                    data = session.sock.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.closed_after = time.monotonic() - started
                    return
                self.received += data
        finally:
            session.close()


def test_slow_loris_connections_time_out_and_a_real_client_is_served(
    server_factory: Any,
) -> None:
    server = server_factory(limits={"command_timeout": "3s"}).start()
    before = rss_mib(server)
    clients = [SlowClient(server, trickle=n % 2 == 0) for n in range(40)]
    threads = [threading.Thread(target=c.run, args=(15.0,), daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    started = time.monotonic()
    send_well_behaved(server, "during-slow-loris")
    assert time.monotonic() - started < 3
    for thread in threads:
        thread.join(20)
    for client in clients:
        text = client.received.decode(errors="replace")
        kind = "trickling" if client.trickle else "silent"
        assert client.closed_after is not None, f"{kind} connection never closed: {text!r}"
        assert 2.5 < client.closed_after < 8, f"{kind} closed after {client.closed_after:.1f}s"
        assert text.startswith("220 ") and "\r\n421 4.4.2 " in text, f"{kind}: {text!r}"
    send_well_behaved(server, "after-slow-loris")
    after = rss_mib(server)
    print(f"\nslow-loris: RSS {before:.1f} MiB before, {after:.1f} MiB after")
    assert after < RSS_LIMIT_MIB


def test_connection_hog_is_refused_per_ip_until_its_sessions_time_out(
    server_factory: Any,
) -> None:
    per_ip = 5
    hog_ip = "127.0.0.3"  # not the address the fixture's start-up probe came from
    server = server_factory(
        limits={"max_connections_per_ip": per_ip, "command_timeout": "3s"}
    ).start()
    hog = [RawSession(server, source=hog_ip) for _ in range(per_ip)]
    try:
        for session in hog:
            assert session.reply().startswith("220 ")
        extra = RawSession(server, source=hog_ip)
        try:
            assert extra.reply().startswith("421 4.7.0")
            assert extra.closed_by_server()
        finally:
            extra.close()
        # Another loopback address is not this client.
        send_well_behaved(server, "other-ip")
        started = time.monotonic()
        for session in hog:
            assert session.reply().startswith("421 4.4.2")
            assert session.closed_by_server()
        assert time.monotonic() - started < 8
    finally:
        for session in hog:
            session.close()
    for n in range(per_ip + 1):
        send_well_behaved(server, f"after-hog-{n}", source=hog_ip)
    assert rss_mib(server) < RSS_LIMIT_MIB


def test_clients_that_disconnect_without_quit_free_their_connection_slot(
    server_factory: Any,
) -> None:
    """Scanners and health checks hang up without QUIT; their slots must not linger.

    With the default five-minute command timeout, a session the server kept after
    the client's FIN would lock the client's address out for five minutes.
    """
    per_ip = 3
    ip = "127.0.0.4"
    server = server_factory(limits={"max_connections_per_ip": per_ip}).start()
    for n in range(3 * per_ip):
        # Hang up at once, after the banner, or after EHLO with a half-close.
        session = RawSession(server, source=ip)
        if n % 3 and session.reply().startswith("220 ") and n % 3 == 2:
            session.send(b"EHLO scanner.test\r\n")
            session.reply()
            session.sock.shutdown(socket.SHUT_WR)
        session.close()
        time.sleep(0.05)
    queued = wait_for_success(
        lambda: send_well_behaved(server, "after-hangups", source=ip),
        5,
        f"{3 * per_ip} clients that hung up to free the slots they held",
        errors=(smtplib.SMTPConnectError,),
        interval=0.2,
    )
    assert queued in {m["id"] for m in server.queue()}
