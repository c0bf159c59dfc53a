"""deploy/: the systemd unit, the example configuration, the alert rules, the dashboard.

The unit is checked by systemd's own tools where the machine has them
(``systemd-analyze verify``, and ``systemd-analyze security`` must rate it 2.0
or lower, the score the README quotes); the alert rules by ``promtool`` (Debian's
``prometheus`` package) where it is installed.  Everywhere, the rules and the
dashboard may name only metrics that backupmx exports, and the example
configuration must pass ``config check``.

What needs none of these programs (the unit's settings, the metric names, the
dashboard's shape) is in tests/unit/test_deploy.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "backupmx.service"
MAX_EXPOSURE = 2.0

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze (Debian: systemd) not installed",
)


def under_root(text: str, root: Path) -> str:
    """The unit as installed under a temporary root: /opt, /etc and /var paths moved there."""
    return re.sub(r"(?<![\w/])/(opt|etc|var)/", lambda m: f"{root}/{m.group(1)}/", text)


def security_score(unit: Path) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


# --------------------------------------------------------------------------- the unit


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    program = tmp_path / "opt" / "backupmx" / "bin" / "backupmx"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    installed = tmp_path / "backupmx.service"
    installed.write_text(under_root(UNIT.read_text(), tmp_path))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(installed)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "backupmx.service" not in result.stderr, result.stderr


@needs_systemd_analyze
def test_systemd_analyze_security_rates_the_unit_2_0_or_lower() -> None:
    score = security_score(UNIT)
    print(f"systemd-analyze security: backupmx.service exposure {score}")
    assert score <= MAX_EXPOSURE
    assert f"rates it {score}" in (ROOT / "README.md").read_text(), "README quotes the score"


# --------------------------------------------------------------------------- configuration


def test_example_config_passes_config_check(tmp_path: Path) -> None:
    """As installed: the SQLite queue's directory exists (tmpfiles makes it), here moved
    under a temporary root, since `config check` checks that it is writable."""
    example = (DEPLOY / "backupmx.toml").read_text()
    assert 'database = "sqlite:////var/lib/backupmx/queue.db"' in example
    (tmp_path / "var" / "lib" / "backupmx").mkdir(parents=True)
    installed = tmp_path / "backupmx.toml"
    installed.write_text(example.replace("sqlite:////var/", f"sqlite:///{tmp_path}/var/"))
    result = subprocess.run(
        [sys.executable, "-m", "backupmx", "--config", str(installed), "config", "check", "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    checked = json.loads(result.stdout)
    assert checked["database"] == f"sqlite:///{tmp_path}/var/lib/backupmx/queue.db"
    assert checked["domains"] == ["example.com"]


# --------------------------------------------------------------------------- monitoring


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian: prometheus) missing"
)
def test_promtool_accepts_the_alert_rules_and_their_unit_tests() -> None:
    checked = subprocess.run(
        ["promtool", "check", "rules", str(DEPLOY / "backupmx-alerts.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        ["promtool", "test", "rules", "backupmx-alerts.test.yml"],
        capture_output=True, text=True, timeout=60, cwd=DEPLOY,
    )  # fmt: skip
    assert tested.returncode == 0, tested.stdout + tested.stderr
