"""The control socket (`backupmx.control`) on real Unix sockets, in one process: what a
client is told, and how a channel claims its path — a crashed server's file is
replaced, a live server's is not, and a clean stop leaves nothing behind.

`backupmx status` against real `serve` processes is in tests/integration/test_status.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path

import pytest

from backupmx import config as configuration
from backupmx.control import Channel, NoAnswer, Running, ask
from backupmx.preflight import StartupFailure

CONFIG = configuration.load(None, {"hostname": "mx2.backup.test", "listen": ["127.0.0.1:2525"]})


def channel(path: Path) -> Channel:
    return Channel(path, CONFIG, "bmx-a:mx2.backup.test", "1.2.3")


async def no_problem() -> str | None:
    return None


async def test_a_client_gets_one_json_report_and_the_socket_goes_at_close(tmp_path: Path) -> None:
    path = tmp_path / "queue.sock"
    server = channel(path)
    await server.open()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        starting = await ask(path)
        assert (starting["state"], starting["accepting"], starting["store"]) == (
            "starting",
            False,
            None,
        )
        server.running = Running(lambda: True, lambda: True, no_problem)
        report = await ask(path)
    finally:
        await server.close()
    assert report["pid"] == os.getpid()
    assert report["version"] == "1.2.3" and report["node"] == "bmx-a:mx2.backup.test"
    assert report["listen"] == ["127.0.0.1:2525"] and report["metrics"] == "127.0.0.1:9325"
    assert report["state"] == "running" and report["fence_up"] is True
    assert report["store"] == {"reachable": True, "error": None}
    assert report["started_at"].endswith("Z") and report["uptime_seconds"] >= 0
    assert not path.exists()
    with pytest.raises(NoAnswer) as silence:
        await ask(path)
    assert silence.value.running is False


async def test_a_crashed_servers_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "queue.sock"
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(path))  # bound, never listening, then closed: as after SIGKILL
    left.close()
    server = channel(path)
    await server.open()
    try:
        assert (await ask(path))["pid"] == os.getpid()
    finally:
        await server.close()


async def test_a_live_servers_socket_is_not_taken(tmp_path: Path) -> None:
    path = tmp_path / "queue.sock"
    first = channel(path)
    await first.open()
    try:
        with pytest.raises(StartupFailure) as refused:
            await channel(path).open()
        (problem,) = refused.value.problems
        assert problem.key == "control_socket" and problem.environment
        assert str(problem) == (
            f"control_socket: {path}: another backupmx serve is running"
            " (it answers on this control socket)"
        )
        assert (await ask(path))["state"] == "starting"  # the first still answers
    finally:
        await first.close()


async def test_a_path_that_cannot_be_a_socket_is_one_line_naming_the_key(tmp_path: Path) -> None:
    regular = tmp_path / "queue.sock"
    regular.write_text("not a socket")
    cases = {
        regular: "exists and is not a socket",
        tmp_path / "missing" / "queue.sock": "cannot listen on it: No such file or directory",
        tmp_path / ("x" * 120 + ".sock"): "longer than the 107 bytes",
    }
    for path, text in cases.items():
        with pytest.raises(StartupFailure) as refused:
            await channel(path).open()
        assert str(refused.value).startswith(f"control_socket: {path}: {text}")
    assert regular.read_text() == "not a socket"


async def test_a_server_that_accepts_but_says_nothing_is_not_answering(tmp_path: Path) -> None:
    path = tmp_path / "queue.sock"
    silent = await asyncio.start_unix_server(lambda reader, writer: None, path)
    try:
        with pytest.raises(NoAnswer) as silence:
            await ask(path, wait=0.5)
    finally:
        silent.close()
    assert silence.value.reason == "no answer within 0.5s"
    assert silence.value.running is None
