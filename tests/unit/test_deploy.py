"""deploy/, pure: the systemd unit's settings, the example configuration's ports, the
alert rules and the dashboard, read as files.

The unit must be of type notify, run unprivileged with CAP_NET_BIND_SERVICE only,
carry the hardening the issue asks for and give the drain room to finish; the
rules and the dashboard may name only metrics that backupmx exports.  What needs
systemd's tools, promtool or `config check` is in tests/integration/test_deploy.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from backupmx import metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "backupmx.service"


def unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> every value it is given (a unit may repeat a key, e.g. SystemCallFilter=)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


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


# --------------------------------------------------------------------------- configuration


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
        "BackupMXDiskLow",
        "BackupMXDomainDNSFailing",
    } <= set(alerts)
    # `up{job="backupmx"}` matches the scrape job of the README.
    assert 'job="backupmx"' in rules
    assert "job_name: backupmx" in (ROOT / "README.md").read_text()


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
