"""Receiver workers of a real `backupmx serve`: shared limits, drain, replacement.

Serve binds the listening sockets and runs ``receivers`` worker processes that
accept from them (docs/receiving.md#receiver-workers).  To put a session on a
chosen worker, a test stops the other one with SIGSTOP while it connects: the
kernel's accept queue is shared, so only the running worker takes it.  Which
worker holds a connection is read from /proc (the socket's inode among the
worker's open files).

What must hold: the per-address connection limit counts every worker's
connections (N allowed, N+1 from one address → exactly one ``421``); SIGTERM
drains every worker (idle sessions get ``421 4.3.2``, sessions in DATA finish
and are stored) and nothing is left running; a SIGKILLed worker is replaced and
every message answered ``250`` is in the queue.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.processes import receivers
from tests.support.server import DOMAIN, ServerProcess
from tests.support.smtp_client import RawSession, queue_id
from tests.support.waiting import wait_for

LOAD_MESSAGES = 400  # at most, for the replacement test
LOAD_SECONDS = 30.0  # and at most this long


def receiver_pids(server: ServerProcess) -> list[int]:
    assert server.process is not None
    return receivers(server.process.pid)


def wait_for_receivers(server: ServerProcess, count: int) -> list[int]:
    return wait_for(
        lambda: (pids := receiver_pids(server)) and len(pids) == count and pids,
        20,
        f"{count} receiver workers",
    )


def sessions_held(pid: int, port: int) -> int:
    """Established connections to `port` among the open files of process `pid`."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01":  # ESTABLISHED
            inodes.add(fields[9])
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            held += 1
    return held


@contextmanager
def only(running: int, stopped: list[int]) -> Iterator[None]:
    """While inside, only `running` of the workers takes connections."""
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


def greeted(server: ServerProcess) -> RawSession:
    session = RawSession(server)
    greeting = session.reply()
    assert greeting.startswith("220 "), greeting
    return session


def test_the_per_address_limit_counts_the_connections_of_every_receiver(
    server_factory: Any,
) -> None:
    allowed = 4
    server = server_factory(receivers=2, limits={"max_connections_per_ip": allowed}).start()
    first, second = wait_for_receivers(server, 2)
    with only(first, [second]):
        on_first = [greeted(server) for _ in range(allowed // 2)]
    with only(second, [first]):
        on_second = [greeted(server) for _ in range(allowed - allowed // 2)]
    sessions = on_first + on_second
    try:
        assert sessions_held(first, server.port) == allowed // 2
        assert sessions_held(second, server.port) == allowed - allowed // 2
        for stopped in ([second], [first]):  # refused by either worker
            running = first if stopped == [second] else second
            with only(running, stopped):
                extra = RawSession(server)
                assert extra.reply().startswith("421 4.7.0"), "one more than allowed"
                extra.close()
        sessions.pop().close()  # a seat given back on the second worker...
        time.sleep(0.5)
        with only(first, [second]):
            sessions.append(greeted(server))  # ...is taken on the first
    finally:
        for session in sessions:
            session.close()
    # N+1 at once, wherever the kernel puts them: exactly one is refused.
    time.sleep(0.5)
    burst = [RawSession(server) for _ in range(allowed + 1)]
    try:
        replies = [session.reply() for session in burst]
    finally:
        for session in burst:
            session.close()
    assert sorted(r[:3] for r in replies) == ["220"] * allowed + ["421"], replies


def test_sigterm_drains_every_receiver(server_factory: Any) -> None:
    server = server_factory(receivers=2, limits={"drain_timeout": "15s"}).start()
    receivers = wait_for_receivers(server, 2)
    busy = []
    for index, running in enumerate(receivers):
        with only(running, [pid for pid in receivers if pid != running]):
            session = greeted(server)
        assert session.command("EHLO client.test").startswith("250")
        assert session.command("MAIL FROM:<drain@sender.test>").startswith("250")
        assert session.command(f"RCPT TO:<drain{index}@{DOMAIN}>").startswith("250")
        assert session.command("DATA").startswith("354")
        session.sock.sendall(f"Subject: drain {index}\r\n\r\nfirst half\r\n".encode())
        busy.append(session)
    idle = greeted(server)
    assert [sessions_held(pid, server.port) for pid in receivers] != [0, 0]
    try:
        server.signal(signal.SIGTERM)
        assert idle.reply().startswith("421 4.3.2")
        stored = []
        for session in busy:
            session.sock.sendall(b"second half\r\n.\r\n")
            stored.append(queue_id(session.reply()))
        assert server.wait_for_exit(20) == 0
    finally:
        idle.close()
        for session in busy:
            session.close()
    assert not any(Path(f"/proc/{pid}").exists() for pid in receivers), "a worker outlived serve"
    assert sorted(m["id"] for m in server.queue()) == sorted(stored)


def test_a_killed_receiver_is_replaced_and_no_acknowledged_message_is_lost(
    server_factory: Any,
) -> None:
    server = server_factory(receivers=2).start()
    victim, survivor = wait_for_receivers(server, 2)
    acknowledged: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + LOAD_SECONDS

    def sender(number: int) -> None:
        while time.monotonic() < deadline:
            with lock:
                if len(acknowledged) + len(refused) >= LOAD_MESSAGES:
                    return
            try:
                with smtplib.SMTP(server.host, server.port, timeout=10) as client:
                    client.ehlo("client.test")
                    client.mail(f"load{number}@sender.test")
                    client.rcpt(f"load{number}@{DOMAIN}")
                    code, reply = client.data(b"Subject: load\r\n\r\n" + b"x" * 2000 + b"\r\n")
            except (smtplib.SMTPException, OSError) as error:
                with lock:
                    refused.append(f"{type(error).__name__}: {error}")
                continue
            with lock:
                if code == 250:
                    acknowledged.append(queue_id(reply.decode()))
                else:
                    refused.append(f"{code} {reply!r}")

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(acknowledged) >= 50, 20, "50 messages accepted")
        os.kill(victim, signal.SIGKILL)
        killed_at = len(acknowledged)
    finally:
        for thread in threads:
            thread.join(LOAD_SECONDS + 15)
    try:
        replacement = wait_for(
            lambda: [pid for pid in receiver_pids(server) if pid not in (victim, survivor)],
            20,
            "a new receiver worker",
        )
    except AssertionError as error:
        raise AssertionError(f"{error}\n{server.log()[-3000:]}") from None
    assert len(replacement) == 1 and survivor in receiver_pids(server)
    assert len(acknowledged) > killed_at, "mail was taken after the kill"
    assert not [r for r in refused if r[:1] == "5"], refused  # never a 5xx for a crash
    stored = {m["id"] for m in server.queue()}
    lost = [queue for queue in acknowledged if queue not in stored]
    assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged messages are missing"
    assert "receiver_exited" in server.log() and "receiver_replaced" in server.log()
    # The replacement takes connections.
    with (
        only(replacement[0], [survivor]),
        socket.create_connection((server.host, server.port), timeout=10) as late,
    ):
        assert late.recv(512).startswith(b"220 ")
