"""The queue intake process: received mail is committed by a child of `backupmx serve`.

Its life is tied to the server's: it ignores the signals systemd sends to the whole
control group (the server decides when to stop), it leaves when the server is gone,
and the server starts a new one when it dies.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from conftest import DOMAIN, ServerProcess
from smtp_client import RawClient, queue_id


def intake_pids(server: ServerProcess) -> list[int]:
    """The server's children that run the intake."""
    assert server.process is not None
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == server.process.pid and b"backupmx.queue.intake" in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def send(server: ServerProcess, tag: str) -> str:
    with RawClient(server.host, server.port) as client:
        assert client.command("EHLO intake.test").code == 250
        reply = client.transaction(
            f"{tag}@sender.test", [f"bob@{DOMAIN}"], f"Subject: {tag}\r\n\r\nbody\r\n.\r\n".encode()
        )
    assert reply.code == 250, reply
    return queue_id(reply)


def test_the_intake_ignores_sigterm_and_a_killed_intake_is_replaced(server: ServerProcess) -> None:
    (first,) = intake_pids(server)
    os.kill(first, signal.SIGTERM)  # systemd signals the whole control group
    time.sleep(0.5)
    assert alive(first)
    held = [send(server, "after-sigterm")]

    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(first):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.1)  # a failing intake is restarted at most once a second
    held.append(send(server, "after-kill"))  # the next message starts a new intake
    (second,) = intake_pids(server)
    assert second != first
    assert {m["id"] for m in server.queue()} == set(held)
    assert server.stop() == 0
    assert not alive(second)


def test_the_intake_leaves_when_the_server_is_killed(server: ServerProcess) -> None:
    (intake,) = intake_pids(server)
    server.kill()
    deadline = time.monotonic() + 10
    while alive(intake):
        assert time.monotonic() < deadline, "the intake outlived its server"
        time.sleep(0.05)
