"""The deliverer's working-set limits and the housekeeping interval as [delivery] settings:
their defaults are the figures that were constants, and bad values name their key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from backupmx.config import ConfigError, Delivery, load

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "backupmx.toml"
NEW = {"max_recipients_in_flight", "claim_batch", "housekeeping_interval"}


def delivery(**values: Any) -> Delivery:
    return load(None, {"hostname": "mx2.example.net", "delivery": values}).delivery


def test_defaults_are_the_documented_figures() -> None:
    """claim_batch went from 500 to 100 and the lease from 10 minutes to 30 s when
    nodes came to share a backlog and to take over a dead node's work within seconds
    (docs/cluster.md)."""
    settings = delivery()
    assert settings.max_recipients_in_flight == 2000
    assert settings.claim_batch == 100
    assert settings.lease == 30.0
    assert settings.housekeeping_interval == 60.0


def test_the_settings_are_read_from_the_delivery_table() -> None:
    settings = delivery(max_recipients_in_flight=50, claim_batch=10, housekeeping_interval="5m")
    assert (settings.max_recipients_in_flight, settings.claim_batch) == (50, 10)
    assert settings.housekeeping_interval == 300.0


def test_a_claim_batch_larger_than_the_working_set_is_accepted() -> None:
    # The deliverer never claims more than there is room for.
    assert delivery(max_recipients_in_flight=10, claim_batch=500).claim_batch == 500


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("max_recipients_in_flight", 0, "must be at least 1"),
        ("max_recipients_in_flight", -5, "must be a non-negative integer"),
        ("max_recipients_in_flight", "2000", "must be a non-negative integer"),
        ("max_recipients_in_flight", 2.5, "must be a non-negative integer"),
        ("claim_batch", 0, "must be at least 1"),
        ("claim_batch", True, "must be a non-negative integer"),
        ("housekeeping_interval", "0s", "must be at least 1s"),
        ("housekeeping_interval", "500ms", "must be at least 1s"),
        ("housekeeping_interval", "soon", "is not a duration"),
    ],
)
def test_a_bad_value_is_refused_naming_its_key(key: str, value: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        delivery(**{key: value})
    assert refused.value.key == f"delivery.{key}"
    assert problem in refused.value.problem


def test_the_example_configuration_shows_each_setting_commented_with_its_default() -> None:
    text = EXAMPLE.read_text()
    section = text[text.index("\n[delivery]\n") : text.index("\n[dns]\n")]
    shown: dict[str, Any] = {}
    for line in section.splitlines():
        setting = line.removeprefix("# ").split("  #")[0]
        if setting.split(" = ")[0] in NEW:
            shown |= tomllib.loads(setting)
    assert set(shown) == NEW
    assert delivery(**shown) == Delivery()
