"""The README's two commands stay true: the quick start installs and serves, CI runs the tests.

The quick-start command is taken from README.md and run as written, in a copy
of the repository, with a fresh venv (pip installs from the package index).
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
import time
from pathlib import Path

from tests.support.waiting import wait_for_port

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)\n```", quick_start, re.S)


def test_readme_has_exactly_two_quick_start_commands_and_ci_runs_the_second() -> None:
    serve, tests = readme_commands()
    assert "backupmx serve" in serve and "127.0.0.1:2525" in serve
    assert tests == "bash tests/run.sh"
    assert "exec bash tests/run.sh" in (ROOT / ".ci" / "run").read_text()


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
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            try:
                wait_for_port("127.0.0.1", 2525, timeout=1)
                break
            except TimeoutError:
                continue
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
