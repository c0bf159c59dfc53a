"""The README's two commands stay true: the quick start installs and serves, CI runs the tests.

The quick-start command is taken from README.md and run as written, in a copy
of the repository, with a fresh venv (pip installs from the package index).
That the README has those two commands, and CI runs the second, is checked in
tests/unit/test_readme.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

from tests.support.readme import ROOT, readme_commands
from tests.support.waiting import port_open, wait_for


def test_readme_quick_start_installs_and_holds_mail(tmp_path: Path) -> None:
    serve, _ = readme_commands()
    checkout = tmp_path / "backupmx"
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, (t.decode() for t in tracked)):
        target = checkout / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, target)
    log = (tmp_path / "quickstart.log").open("wb")
    process = subprocess.Popen(
        ["bash", "-c", serve],
        cwd=checkout,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: process.poll() is not None or port_open("127.0.0.1", 2525),
            300,
            "the quick start to listen on 127.0.0.1:2525 (or exit)",
        )
        assert process.poll() is None, (tmp_path / "quickstart.log").read_text()[-3000:]
        with smtplib.SMTP("127.0.0.1", 2525, timeout=30) as client:
            code, text = client.ehlo("client.test")
            assert code == 250 and b"mx2.example.test" in text
            client.sendmail("a@sender.test", ["user@example.test"], b"Subject: hi\r\n\r\nhi\r\n")
        assert (checkout / "backupmx.db").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    assert process.returncode == 0, (tmp_path / "quickstart.log").read_text()


def test_readme_configuration_example_passes_config_check(tmp_path: Path) -> None:
    section = (ROOT / "README.md").read_text().split("## Configuration", 1)[1]
    (example,) = re.findall(r"```toml\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    path = tmp_path / "backupmx.toml"
    path.write_text(example)
    result = subprocess.run(
        [sys.executable, "-m", "backupmx", "--config", str(path), "config", "check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
