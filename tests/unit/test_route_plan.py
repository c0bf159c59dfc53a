"""Route planning as its pure steps (deliver/route.py): the MX set an answer names,
our own preference in it, the pruning to what is better than us, and the hops in
order.  tests/unit/test_route.py walks whole routes; this file pins each step, and
invariant 4 over generated MX sets.

As there, this host is mx2.backup.test, listening on 127.0.0.1:2525, with the
machine address 192.0.2.2; primaries live on other 127.0.0.x addresses.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backupmx.deliver.route import (
    Bounce,
    Defer,
    Hop,
    Identity,
    RoutePlan,
    better_than,
    in_order,
    mx_set,
    route_mx,
    self_preference,
)
from backupmx.mail.hosts import HostPort
from backupmx.resolver import (
    AddressAnswer,
    Addresses,
    MxAnswer,
    MxRecord,
    MxRecords,
    NoData,
    NullMx,
    NxDomain,
    TempFail,
)

ME = Identity.of(
    "mx2.backup.test", ["relay.backup.test"], [HostPort("127.0.0.1", 2525)], ["192.0.2.2"]
)
DOMAIN = "example.test"


def records(*pairs: tuple[int, str]) -> list[MxRecord]:
    return [MxRecord(p, h) for p, h in pairs]


def found(*addresses: str) -> Addresses:
    return Addresses(addresses)


# --------------------------------------------------------------------------- the MX set


def test_each_host_is_kept_once_at_its_best_preference() -> None:
    answer = MxRecords(tuple(records((30, "a.test"), (10, "b.test"), (20, "a.test"))))
    candidates = mx_set(DOMAIN, answer)
    assert isinstance(candidates, list)
    assert set(candidates) == set(records((20, "a.test"), (10, "b.test")))


def test_a_root_target_names_no_host() -> None:
    answer = MxRecords(tuple(records((0, ""), (10, "a.test"))))
    assert mx_set(DOMAIN, answer) == records((10, "a.test"))


def test_no_mx_record_is_the_domain_itself_at_preference_0() -> None:
    assert mx_set(DOMAIN, NoData()) == records((0, DOMAIN))


@pytest.mark.parametrize(
    ("answer", "decision"),
    [
        (NullMx(), Bounce),
        (NxDomain(), Bounce),
        (TempFail("SERVFAIL"), Defer),
    ],
)
def test_an_answer_without_mx_hosts_is_decided_at_once(answer: MxAnswer, decision: type) -> None:
    assert isinstance(mx_set(DOMAIN, answer), decision)


@pytest.mark.parametrize(
    ("answer", "decision"),
    [
        (NullMx(), Bounce),  # the domain's own statement: it takes no mail
        (NxDomain(), Defer),  # a DNS accident at its provider must not bounce its mail
        (TempFail("SERVFAIL"), Defer),
    ],
)
def test_a_backed_up_domain_bounces_only_for_its_null_mx(answer: MxAnswer, decision: type) -> None:
    assert isinstance(mx_set(DOMAIN, answer, backed_up=True), decision)


# --------------------------------------------------------------------------- who we are in it


def test_we_have_no_preference_in_a_set_without_us() -> None:
    candidates = records((10, "mx1.example.test"), (20, "mx3.example.test"))
    addresses = {"mx1.example.test": found("127.0.0.2"), "mx3.example.test": found("127.0.0.3")}
    assert self_preference(candidates, addresses, ME, 25) is None


def test_our_preference_is_found_by_name_without_any_address() -> None:
    candidates = records((10, "mx1.example.test"), (20, "MX2.backup.test."))
    assert self_preference(candidates, {}, ME, 25) == 20


def test_our_preference_is_found_by_one_address_of_a_host_under_another_name() -> None:
    candidates = records((10, "mx1.example.test"), (30, "backup.example.test"))
    addresses = {"backup.example.test": found("127.0.0.9", "192.0.2.2")}
    assert self_preference(candidates, addresses, ME, 25) == 30


def test_our_best_preference_counts_when_we_appear_twice() -> None:
    candidates = records((40, "mx2.backup.test"), (15, "relay.backup.test"))
    assert self_preference(candidates, {}, ME, 25) == 15


def test_a_loopback_mx_is_us_only_on_the_port_we_listen_on() -> None:
    candidates = records((10, "local.example.test"))
    addresses = {"local.example.test": found("127.0.0.1")}
    assert self_preference(candidates, addresses, ME, 2525) == 10
    assert self_preference(candidates, addresses, ME, 25) is None


# --------------------------------------------------------------------------- pruning


def test_only_hosts_strictly_better_than_us_are_kept() -> None:
    candidates = records((10, "a.test"), (20, "b.test"), (20, "c.test"), (30, "d.test"))
    assert better_than(candidates, 20) == records((10, "a.test"))


def test_nothing_is_pruned_when_we_are_not_in_the_set() -> None:
    candidates = records((10, "a.test"), (20, "b.test"))
    assert better_than(candidates, None) == candidates


def test_being_the_best_mx_leaves_nothing() -> None:
    assert better_than(records((10, "a.test"), (10, "b.test")), 10) == []


# --------------------------------------------------------------------------- hops in order


def test_hops_go_by_preference_then_host_then_resolver_order() -> None:
    candidates = records((20, "b.test"), (10, "a.test"))
    addresses: dict[str, AddressAnswer] = {
        "a.test": found("::2", "127.0.0.2"),
        "b.test": found("127.0.0.3"),
    }
    hops, problems = in_order(candidates, addresses, 25, random.Random(0))
    assert hops == (
        Hop("a.test", "::2", 25, 10),
        Hop("a.test", "127.0.0.2", 25, 10),
        Hop("b.test", "127.0.0.3", 25, 20),
    )
    assert problems == []


def test_the_shuffle_of_equal_preferences_depends_on_the_rng_alone() -> None:
    names = [f"h{i}.test" for i in range(6)]
    addresses: dict[str, AddressAnswer] = {n: found(f"127.0.1.{i}") for i, n in enumerate(names)}
    forward = records(*((10, n) for n in names))
    backward = list(reversed(forward))
    for seed in range(10):
        one, _ = in_order(forward, addresses, 25, random.Random(seed))
        two, _ = in_order(backward, addresses, 25, random.Random(seed))
        assert one == two


def test_hosts_without_an_address_are_left_out_with_the_reason() -> None:
    candidates = records((10, "a.test"), (10, "b.test"), (10, "c.test"), (10, "d.test"))
    addresses: dict[str, AddressAnswer] = {
        "a.test": TempFail("timed out after 5s"),
        "b.test": NxDomain(),
        "c.test": NoData(),
    }
    hops, problems = in_order(candidates, addresses, 25, random.Random(0))
    assert hops == ()
    assert sorted(problems) == [
        "a.test: timed out after 5s",
        "b.test: no such host (NXDOMAIN)",
        "c.test: no A or AAAA record",
        "d.test: not resolved",
    ]


def test_one_address_is_tried_once_whatever_its_spelling() -> None:
    candidates = records((10, "a.test"), (20, "b.test"))
    addresses: dict[str, AddressAnswer] = {
        "a.test": found("127.0.0.2"),
        "b.test": found("::ffff:127.0.0.2", "127.0.0.3"),
    }
    hops, _ = in_order(candidates, addresses, 25, random.Random(0))
    assert [(h.host, h.address) for h in hops] == [("a.test", "127.0.0.2"), ("b.test", "127.0.0.3")]


# --------------------------------------------------------------------------- invariant 4

HOSTS = [f"mx{i}.example.test" for i in range(5)]


@given(
    st.lists(st.tuples(st.integers(0, 50), st.sampled_from(HOSTS)), min_size=1, max_size=8),
    st.integers(0, 50),
    st.integers(0, 2**16),
)
def test_no_route_reaches_us_or_an_mx_no_better_than_us(
    primaries: list[tuple[int, str]], ours: int, seed: int
) -> None:
    answer = MxRecords((*records(*primaries), MxRecord(ours, "mx2.backup.test")))
    addresses: dict[str, AddressAnswer] = {
        h: found(f"127.0.0.{i + 2}") for i, h in enumerate(HOSTS)
    }
    result = route_mx(DOMAIN, answer, addresses, ME, 25, random.Random(seed))
    if isinstance(result, RoutePlan):
        assert all(hop.preference < ours for hop in result.hops)
        assert {hop.host for hop in result.hops} == {h for p, h in primaries if p < ours}
    else:
        assert isinstance(result, Defer)
        assert all(p >= ours for p, _ in primaries)
