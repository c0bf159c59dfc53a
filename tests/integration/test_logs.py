"""Log output: one JSON record per line, also when two processes share stdout.

`backupmx serve` and its intake process write to the same stdout (a journald
stream, or a file).  Run unbuffered (PYTHONUNBUFFERED, usual under systemd and
in containers), every record must still reach it in one write with its newline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WRITER = """
import structlog
from backupmx import logs
logs.configure("info")
log = structlog.get_logger()
for n in range(2000):
    log.info("tick", n=n, pad="x" * 50)
"""


def test_records_of_two_unbuffered_processes_never_share_a_line(tmp_path: Path) -> None:
    path = tmp_path / "serve.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with path.open("ab") as out:
        writers = [
            subprocess.Popen([sys.executable, "-c", WRITER], stdout=out, env=env) for _ in range(2)
        ]
        for writer in writers:
            assert writer.wait(timeout=60) == 0
    lines = path.read_bytes().splitlines()
    assert len(lines) == 4000
    broken = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            broken.append(line)
    assert not broken, broken[:3]
