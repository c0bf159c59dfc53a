"""Per-host pacing (`backupmx.deliver.pacer`), pure: the bound on the hosts it
remembers (DSNs reach as many hosts as there are senders).

Pacing against a real ``backupmx serve`` and a slow primary is in
tests/integration/test_pacing.py.
"""

from __future__ import annotations

import pytest

from backupmx.deliver import pacer
from backupmx.deliver.pacer import Pacers


async def test_idle_hosts_past_the_bound_are_forgotten_least_recently_used_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pacer, "MAX_PACED_HOSTS", 2)
    pacers = Pacers(initial=2, maximum=10, rate=0)
    pacers["192.0.2.1"].congestion()
    pacers["192.0.2.2"]
    pacers["192.0.2.1"]  # used again: now the most recent
    pacers["192.0.2.3"]
    assert set(pacers.windows()) == {"192.0.2.1", "192.0.2.3"}
    assert pacers.windows()["192.0.2.1"] == 1.0  # what it learned is kept while it is


async def test_a_host_in_use_is_never_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pacer, "MAX_PACED_HOSTS", 2)
    pacers = Pacers(initial=1, maximum=10, rate=0)
    busy = pacers["192.0.2.1"]
    async with busy.slot():
        for i in range(2, 10):
            pacers[f"192.0.2.{i}"]
        assert pacers["192.0.2.1"] is busy  # one pacer per host: its window is not split
        assert len(pacers.windows()) == 2
    pacers["192.0.2.20"]
    pacers["192.0.2.21"]
    assert "192.0.2.1" not in pacers.windows()  # idle now, and the oldest
