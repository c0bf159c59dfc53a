"""This node among those sharing the queue (`backupmx.deliver.membership`), with a fake
store and a fake clock: when the fence holds, what a lapse does, and what a heartbeat
after a lapse gives back.  The same against real processes and PostgreSQL is in
tests/integration/test_cluster.py."""

from __future__ import annotations

from datetime import timedelta

import pytest

from backupmx.deliver import membership as module
from backupmx.deliver.membership import Membership
from backupmx.queue.nodes import NodeReport


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeStore:
    def __init__(self) -> None:
        self.live: tuple[str, ...] = ("a",)
        self.taken_over: dict[str, int] = {}
        self.failing = False
        self.given_back: list[str] = []

    async def heartbeat(self, report: NodeReport, lease: timedelta) -> tuple[str, ...]:
        if self.failing:
            raise OSError("database unreachable")
        return self.live

    async def take_over(self, me: str, live: tuple[str, ...], lease: timedelta) -> dict[str, int]:
        return self.taken_over

    async def give_back_leases(self, owner: str) -> int:
        self.given_back.append(owner)
        return 3


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(module.time, "monotonic", clock)
    return clock


def node(store: FakeStore) -> tuple[Membership, list[str]]:
    events: list[str] = []
    member = Membership(
        store,  # type: ignore[arg-type]
        "a",
        lease=30.0,
        describe=lambda: NodeReport("a", "host", "test", "127.0.0.1:25", 1),
    )
    member.on_lapse = lambda: events.append("lapse")
    member.on_live = lambda count: events.append(f"live {count}")
    member.on_taken_over = lambda: events.append("taken over")
    return member, events


async def test_the_fence_holds_for_two_thirds_of_the_lease_after_a_heartbeat(
    clock: Clock,
) -> None:
    member, _ = node(FakeStore())
    assert not member.holds()  # no heartbeat yet
    await member.beat()
    assert member.holds() and member.holds(member.epoch)
    clock.now += 19.9
    assert member.holds()
    clock.now += 0.2
    assert not member.holds()


async def test_a_database_out_of_reach_drops_the_fence_and_the_next_heartbeat_gives_back(
    clock: Clock,
) -> None:
    store = FakeStore()
    member, events = node(store)
    await member.beat()
    epoch = member.epoch
    store.failing = True
    clock.now += 10
    await member.beat()
    assert events == ["live 1"]  # a failed heartbeat within the fence changes nothing
    clock.now += 11
    await member.beat()
    assert events == ["live 1", "lapse"] and not member.holds()
    store.failing = False
    await member.beat()
    assert store.given_back == ["a"]  # before it claims again
    assert member.holds() and not member.holds(epoch)  # claims made before: never sent


async def test_a_process_continued_after_a_pause_finds_its_fence_fallen(clock: Clock) -> None:
    """SIGSTOP past the lease, SIGCONT: the first heartbeat after the pause succeeds, but
    the claims made before it are not sent, and the node's leases are given back."""
    store = FakeStore()
    member, events = node(store)
    await member.beat()
    epoch = member.epoch
    clock.now += 60
    assert not member.holds(epoch)
    await member.beat()
    assert "lapse" in events and store.given_back == ["a"]
    assert member.holds() and not member.holds(epoch)


async def test_other_nodes_and_take_overs_are_reported(clock: Clock) -> None:
    store = FakeStore()
    member, events = node(store)
    store.live = ("a", "b")
    await member.beat()
    assert member.others() == ("b",) and events == ["live 2"]
    store.live, store.taken_over = ("a",), {"b": 7}
    await member.beat()
    assert events == ["live 2", "live 1", "taken over"]
