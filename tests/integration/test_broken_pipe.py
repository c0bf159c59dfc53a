"""A reader that goes away (`backupmx … | head`) ends the output quietly: no
BrokenPipeError traceback, the exit status a shell gives a process ended by SIGPIPE."""

from __future__ import annotations

import smtplib
import subprocess
import sys
from pathlib import Path

from tests.support.server import ServerProcess


def piped_to_head(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "backupmx", "--config", str(server.config_path), *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None and process.stderr is not None
        # Closed before the command writes anything, as `head` that has had its fill:
        # every write of the command finds no reader.
        process.stdout.close()
        stderr = process.stderr.read()
        status = process.wait(timeout=60)
    return subprocess.CompletedProcess(command, status, b"", stderr)


def test_commands_into_a_closed_pipe(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path).start()
    try:
        body = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 2000
        with smtplib.SMTP(server.host, server.port, timeout=30) as client:
            client.sendmail("a@sender.test", ["user@example.test"], body)
        (message,) = server.queue()
        exported = piped_to_head(server, "queue", "export", message["id"])
        assert exported.returncode == 141, exported.stderr
        assert exported.stderr == b""
        shown = piped_to_head(server, "queue", "show", message["id"], "--raw")
        assert shown.returncode == 141 and shown.stderr == b""
        for args in (("status",), ("queue", "list")):
            quiet = piped_to_head(server, *args)
            assert quiet.returncode == 141 and quiet.stderr == b"", (args, quiet.stderr)
    finally:
        server.stop()
