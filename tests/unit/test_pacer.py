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


async def test_live_nodes_share_each_hosts_budget() -> None:
    """Two nodes with max_connections_per_host = 20 use 10 each, and half the rate; a
    window grown past the new share shrinks to it."""
    pacers = Pacers(initial=4, maximum=20, rate=50)
    grown = pacers["192.0.2.1"]
    for _ in range(200):
        grown.success()
    assert grown.limit == 20
    pacers.share(2)
    assert (grown.maximum, grown.limit, grown.rate) == (10, 10, 25.0)
    fresh = pacers["192.0.2.2"]
    assert (fresh.maximum, fresh.limit, fresh.rate) == (10, 2, 25.0)
    pacers.share(3)
    assert (fresh.maximum, pacers["192.0.2.3"].limit) == (6, 1)
    pacers.share(1)
    assert grown.maximum == 20 and grown.limit == 6  # grows back by successes, not at once


async def test_open_connections_stay_within_the_window() -> None:
    """A connection is kept for the next message only while busy and idle ones together
    stay within the window."""
    host = Pacers(initial=2, maximum=2, rate=0)["192.0.2.1"]
    async with host.slot():
        assert host.keeps_idle(0)  # after this one: 0 busy + 1 idle
        assert host.keeps_idle(1)  # 0 busy + 2 idle
        assert not host.keeps_idle(2)
        async with host.slot():
            assert host.keeps_idle(0)  # 1 busy + 1 idle
            assert not host.keeps_idle(1)
