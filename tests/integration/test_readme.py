"""The README's two commands stay true: the quick start installs and serves, CI runs the tests.

The quick-start command is taken from README.md and run as written, in a copy
of the repository, with a fresh venv (pip installs from the package index).
That the README has those two commands, and CI runs the second, is checked in
tests/unit/test_readme.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.readme import ROOT, quick_start_session, readme_commands
from tests.support.waiting import port_open, wait_for, wait_for_process_port


def test_readme_quick_start_installs_and_holds_mail(tmp_path: Path) -> None:
    """The README's first command serves, its console session holds a message while the
    primary port is closed and delivers it once something listens there."""
    serve, _ = readme_commands()
    session = quick_start_session()
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
    primary: subprocess.Popen[bytes] | None = None

    def run(command: str) -> str:
        done = subprocess.run(
            ["bash", "-c", command], cwd=checkout, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        return done.stdout

    try:
        wait_for(
            lambda: process.poll() is not None or port_open("127.0.0.1", 2525),
            300,
            "the quick start to listen on 127.0.0.1:2525 (or exit)",
        )
        assert process.poll() is None, (tmp_path / "quickstart.log").read_text()[-3000:]
        send, listing, start_primary, flush, final_listing = session
        assert "250" in run(send)
        assert (checkout / "backupmx.db").exists()

        # Held: the primary's port is closed, so the first attempt leaves it queued,
        # its last error naming that port.
        def tried() -> str:
            out = run(listing)
            return out if "2526" in out else ""

        held = wait_for(tried, 30, "a first try")
        assert "user@example.test" in held and "queued" in held, held
        assert start_primary.endswith(" &")
        primary = subprocess.Popen(
            ["bash", "-c", start_primary.removesuffix(" &")],
            cwd=checkout,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        wait_for_process_port(primary, "127.0.0.1", 2526, 30)
        run(flush)
        wait_for(lambda: "delivered" in run(final_listing), 30, "the held message delivered")
        assert "queued" not in run(final_listing)
    finally:
        for child in (primary, process):
            if child is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGTERM)
        process.wait(timeout=60)
    assert primary is not None
    primary.wait(timeout=30)
    assert primary.stdout is not None and b"Subject" in primary.stdout.read()
    assert process.returncode == 0, (tmp_path / "quickstart.log").read_text()
    # The quick start installs no PostgreSQL driver: a postgresql:// queue says so.
    without_driver = subprocess.run(
        [
            *(".venv/bin/backupmx", "serve", "--domain", "example.test"),
            *("--listen", "127.0.0.1:2527"),
            *("--database", "postgresql://backupmx@127.0.0.1:5432/backupmx"),
        ],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert without_driver.returncode == 1
    assert without_driver.stderr == (
        "backupmx: cannot start: database: a postgresql:// queue needs the PostgreSQL driver:"
        " pip install 'backupmx[postgres]'\n"
    )


def test_readme_configuration_example_passes_config_check(tmp_path: Path) -> None:
    """The example is a valid file; what it needs from a real server (port 25 free,
    /var/lib/backupmx) is this machine's business: environment problems only."""
    section = (ROOT / "README.md").read_text().split("## Configuration", 1)[1]
    (example,) = re.findall(r"```toml\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    path = tmp_path / "backupmx.toml"
    path.write_text(example)
    result = subprocess.run(
        [sys.executable, "-m", "backupmx", "--config", str(path), "config", "check", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    assert [p for p in report["problems"] if not p["environment"]] == [], report
    assert report["ok"] == (result.returncode == 0)
