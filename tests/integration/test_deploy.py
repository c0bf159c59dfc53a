"""deploy/: the systemd unit, the example configuration, the alert rules, the dashboard.

The unit is checked by systemd's own tools where the machine has them
(``systemd-analyze verify``, and ``systemd-analyze security`` must rate it 2.0
or lower, the score the README quotes); the alert rules by ``promtool`` (Debian's
``prometheus`` package) where it is installed.  Everywhere, the rules and the
dashboard may name only metrics that backupmx exports, and the example
configuration must pass ``config check``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from backupmx import metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "backupmx.service"
MAX_EXPOSURE = 2.0

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze (Debian: systemd) not installed",
)


def unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> every value it is given (a unit may repeat a key, e.g. SystemCallFilter=)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def under_root(text: str, root: Path) -> str:
    """The unit as installed under a temporary root: /opt, /etc and /var paths moved there."""
    return re.sub(r"(?<![\w/])/(opt|etc|var)/", lambda m: f"{root}/{m.group(1)}/", text)


def exported_metric_names() -> set[str]:
    names: set[str] = set()
    for family in metrics.REGISTRY.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_count", "_sum")}
        else:
            names.add(family.name)
    return names


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


def test_unit_is_type_notify_unprivileged_with_port_25_only() -> None:
    unit = unit_settings(UNIT.read_text())
    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "User": ["backupmx"],
        "Group": ["backupmx"],
        "AmbientCapabilities": ["CAP_NET_BIND_SERVICE"],
        "CapabilityBoundingSet": ["CAP_NET_BIND_SERVICE"],
        "StateDirectory": ["backupmx"],
        "ConfigurationDirectory": ["backupmx"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "ExecStart": ["/opt/backupmx/bin/backupmx --config /etc/backupmx/backupmx.toml serve"],
    }
    assert {key: unit.get(key) for key in expected} == expected
    assert "WatchdogSec" in unit


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("SystemCallFilter", "@system-service"),
        ("MemoryDenyWriteExecute", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("RestrictNamespaces", "yes"),
    ],
)
def test_unit_has_the_hardening_the_issue_asks_for(key: str, value: str) -> None:
    assert value in unit_settings(UNIT.read_text()).get(key, [])


def test_unit_stop_timeout_leaves_room_for_the_drain() -> None:
    from backupmx.config import Limits, parse_duration

    stop = parse_duration(unit_settings(UNIT.read_text())["TimeoutStopSec"][0])
    assert stop >= 2 * Limits().drain_timeout


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


def test_example_config_passes_config_check() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "backupmx", "--config", str(DEPLOY / "backupmx.toml"), "config",
         "check", "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    checked = json.loads(result.stdout)
    assert checked["database"] == "sqlite:////var/lib/backupmx/queue.db"
    assert checked["domains"] == ["example.com"]


def test_example_config_listens_where_the_unit_and_readme_expect() -> None:
    text = (DEPLOY / "backupmx.toml").read_text()
    assert 'listen = "127.0.0.1:9325"' in text
    assert '"127.0.0.1:9325"' in (ROOT / "README.md").read_text()


# --------------------------------------------------------------------------- monitoring


def test_alert_rules_and_dashboard_name_only_exported_metrics() -> None:
    exported = exported_metric_names()
    for name in ("backupmx-alerts.yml", "grafana-dashboard.json"):
        used = set(re.findall(r"\bbackupmx_[a-z_]+", (DEPLOY / name).read_text()))
        assert used, name
        assert used <= exported, f"{name}: {sorted(used - exported)}"


def test_alert_rules_cover_what_the_issue_names() -> None:
    rules = (DEPLOY / "backupmx-alerts.yml").read_text()
    alerts = re.findall(r"- alert: (\w+)", rules)
    assert {
        "BackupMXPrimaryDown",
        "BackupMXQueueGrowing",
        "BackupMXOldMessage",
        "BackupMXStorageErrors",
    } <= set(alerts)
    # `up{job="backupmx"}` matches the scrape job of the README.
    assert 'job="backupmx"' in rules
    assert "job_name: backupmx" in (ROOT / "README.md").read_text()


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


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    assert dashboard["__inputs"][0]["name"] == "DS_PROMETHEUS"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
    titles = " ".join(p["title"] for p in panels)
    for topic in ("Primary", "Oldest", "latency", "Time in queue", "Spam", "window"):
        assert topic in titles
