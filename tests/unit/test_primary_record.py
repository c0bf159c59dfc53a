"""What the deliverer remembers of each domain's primary (`backupmx.deliver.primaries`):
one record per domain, following the primary state table, written through a store;
and how many records and routes it keeps while the destinations grow with the mail."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import pytest

from backupmx.deliver import primaries as primaries_module
from backupmx.deliver.primaries import DomainPolicy, Primaries
from backupmx.deliver.route import Route, RoutePlan
from backupmx.queue.state import PrimaryState


class FakeStore:
    """The two calls `Primaries.observed` makes, with the domains table as a dict."""

    def __init__(self) -> None:
        self.states: dict[str, PrimaryState] = {}
        self.writes: list[tuple[str, PrimaryState | None]] = []
        self.made_due: list[str] = []

    async def set_domain_state(
        self, name: str, state: PrimaryState | None = None, **_: Any
    ) -> bool:
        self.writes.append((name, state))
        changed = state is not None and self.states.get(name) != state
        if state is not None:
            self.states[name] = state
        return changed

    async def make_due(self, *, domain: str, now: datetime | None = None) -> int:
        self.made_due.append(domain)
        return 1


class OneNode:
    """This node alone: its name, and no other live node."""

    name = "host:backup.test"

    def others(self) -> tuple[str, ...]:
        return ()


def primaries(store: FakeStore, on_5xx: str = "bounce", hold_window: float = 3600) -> Primaries:
    policy = DomainPolicy(on_primary_5xx=on_5xx, hold_window=hold_window)
    return Primaries(store, None, None, lambda _: policy, 25, "backup.test", None, OneNode())  # type: ignore[arg-type]


async def test_a_repeated_result_is_written_once_within_the_refresh_interval() -> None:
    store = FakeStore()
    known = primaries(store)
    await known.observed("example.test", False, "refused")
    await known.observed("example.test", False, "refused again")
    assert store.writes == [("example.test", PrimaryState.DOWN)]


async def test_after_a_claim_of_a_domain_written_down_the_next_result_is_written_again() -> None:
    store = FakeStore()
    known = primaries(store)
    await known.observed("example.test", False, "refused")
    store.states["example.test"] = PrimaryState.UNKNOWN  # an operator's flush elsewhere
    known.claimed("example.test")
    await known.observed("example.test", False, "refused again")
    assert store.writes == [("example.test", PrimaryState.DOWN)] * 2
    assert store.states["example.test"] is PrimaryState.DOWN


async def test_down_since_is_the_first_failure_and_an_answer_clears_it() -> None:
    store = FakeStore()
    known = primaries(store)
    assert known.down_since("example.test") is None
    await known.observed("example.test", False, "refused")
    first = known.down_since("example.test")
    await known.observed("example.test", False, "timed out")
    assert known.down_since("example.test") == first
    assert first is not None and first[1] == "refused"
    await known.observed("example.test", True, "delivery via mx")
    assert known.down_since("example.test") is None


async def test_coming_up_releases_the_mail_wakes_the_deliverer_and_opens_the_hold_window() -> None:
    store = FakeStore()
    known = primaries(store, on_5xx="hold")
    woken: list[str] = []
    known.on_up = woken.append
    await known.observed("example.test", False, "refused")
    await known.observed("example.test", True, "probe answered")
    assert store.states["example.test"] is PrimaryState.UP
    assert store.made_due == woken == ["example.test"]
    assert known.in_hold_window("example.test")


async def test_a_primary_seen_down_forgets_when_it_came_up() -> None:
    store = FakeStore()
    known = primaries(store, on_5xx="hold", hold_window=0)
    await known.observed("example.test", True, "probe answered")
    assert not known.in_hold_window("example.test")  # up for longer than the window
    for _ in range(primaries_module.FAILURES_IN_A_ROW):
        await known.observed("example.test", False, "refused")
    assert store.states["example.test"] is PrimaryState.DOWN
    assert known.in_hold_window("example.test")  # since when is unknown: stay careful


async def test_a_primary_known_up_goes_down_only_when_every_attempt_fails() -> None:
    """A primary at its session limit turns one connection away (421) while the others
    deliver: the domain stays up, and no message waiting for its turn is deferred."""
    store = FakeStore()
    known = primaries(store)
    await known.observed("example.test", True, "delivery via mx")
    for _ in range(10):
        for _ in range(primaries_module.FAILURES_IN_A_ROW - 1):
            await known.observed("example.test", False, "421 4.7.0 Too busy")
        await known.observed("example.test", True, "delivery via mx")
    assert store.writes == [("example.test", PrimaryState.UP)]
    assert known.down_since("example.test") is None
    for _ in range(primaries_module.FAILURES_IN_A_ROW):
        await known.observed("example.test", False, "refused")
    assert store.states["example.test"] is PrimaryState.DOWN
    assert known.down_since("example.test") is not None


# --------------------------------------------------------------------------- bounds


async def test_records_past_the_bound_are_forgotten_except_those_a_hold_window_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(primaries_module, "MAX_KNOWN_DOMAINS", 2)
    hold = DomainPolicy(on_primary_5xx="hold", hold_window=0)
    bounce = DomainPolicy()
    known = Primaries(
        FakeStore(),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        lambda domain: hold if domain == "example.com" else bounce,
        25,
        "backup.test",
        None,  # type: ignore[arg-type]
        OneNode(),  # type: ignore[arg-type]
    )
    await known.observed("example.com", True, "probe answered")
    assert not known.in_hold_window("example.com")  # up for longer than its window
    # DSNs to senders' domains whose primaries refuse: one record each.
    for sender in ("a.test", "b.test", "c.test", "d.test"):
        await known.observed(sender, False, "refused")
    assert known.down_since("d.test") is not None
    assert known.down_since("a.test") is None  # forgotten, the least recently written
    assert not known.in_hold_window("example.com")  # kept: forgetting it would hold 5xx


async def test_routes_past_the_bound_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(primaries_module, "MAX_ROUTES", 2)
    planned: list[str] = []

    async def plan(domain: str, *_: Any) -> Route:
        planned.append(domain)
        return RoutePlan(domain, (), "mx")

    monkeypatch.setattr(primaries_module, "plan", plan)
    known = primaries(FakeStore())
    for domain in ("a.test", "b.test", "c.test", "c.test", "a.test"):
        await known.route(domain)
    assert planned == ["a.test", "b.test", "c.test", "a.test"]  # c reused, a asked again


async def test_a_domain_delivered_to_lately_is_not_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its deliveries show the primary answers; a probe would take one more of its
    sessions, one past its limit for a primary that limits them."""
    store = FakeStore()
    store.pending_domains = lambda: _async(["busy.test", "idle.test"])  # type: ignore[attr-defined]
    known = primaries(store)
    probed: list[str] = []

    async def probe(domain: str) -> None:
        probed.append(domain)

    monkeypatch.setattr(known, "probe", probe)
    await known.observed("busy.test", True, "delivery via mx")
    await known.observed("idle.test", True, "probe of mx: ok", probe=True)
    await known.probe_all()
    await asyncio.sleep(0)  # the probes are tasks of their own
    await known.close()
    assert probed == ["idle.test"]


async def _async(value: Any) -> Any:
    return value
