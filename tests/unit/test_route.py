"""Route planning (RFC 5321 §5.1, invariant 4), pure: no sockets, no DNS.

The resolver's answers are written out as data; `Identity` says who we are.
The backup here is mx2.backup.test listening on 127.0.0.1:2525, and this
machine's one non-loopback address is 192.0.2.2.  Primaries live on other
127.0.0.x addresses, as in the integration tests.
"""

from __future__ import annotations

import random

import pytest

from backupmx.deliver.route import (
    Bounce,
    Defer,
    Hop,
    Identity,
    RoutePlan,
    plan,
    route_mx,
    route_static,
)
from backupmx.mail.hosts import HostPort
from backupmx.queue.domains import DNS_FAILURE
from backupmx.resolver import (
    AddressAnswer,
    Addresses,
    MxAnswer,
    MxRecord,
    MxRecords,
    NoData,
    NullMx,
    NxDomain,
    Resolver,
    TempFail,
)

PORT = 25
ME = Identity.of(
    "MX2.Backup.Test.",
    ["relay.backup.test"],
    [HostPort("127.0.0.1", 2525), HostPort("::1", 2525)],
    ["127.0.0.1", "::1", "192.0.2.2", "fd00::2"],
)


def mx(*records: tuple[int, str]) -> MxRecords:
    return MxRecords(tuple(MxRecord(p, h) for p, h in records))


def found(*addresses: str) -> Addresses:
    return Addresses(addresses)


def route(
    answer: MxAnswer,
    addresses: dict[str, AddressAnswer],
    identity: Identity = ME,
    seed: int = 0,
) -> RoutePlan | Defer | Bounce:
    return route_mx("example.test", answer, addresses, identity, PORT, random.Random(seed))


def hosts(result: object) -> list[str]:
    assert isinstance(result, RoutePlan), result
    return [hop.host for hop in result.hops]


# --------------------------------------------------------------------------- self-pruning


def test_backup_at_20_with_primary_at_10_routes_only_to_the_primary() -> None:
    result = route(
        mx((10, "mx1.example.test"), (20, "mx2.backup.test")),
        {"mx1.example.test": found("127.0.0.2"), "mx2.backup.test": found("192.0.2.2")},
    )
    assert result == RoutePlan(
        "example.test", (Hop("mx1.example.test", "127.0.0.2", PORT, 10),), "mx"
    )


def test_self_is_recognised_by_name_even_without_an_address() -> None:
    result = route(
        mx((10, "mx1.example.test"), (20, "mx2.backup.test"), (30, "mx3.example.test")),
        {
            "mx1.example.test": found("127.0.0.2"),
            "mx2.backup.test": TempFail("timeout"),
            "mx3.example.test": found("127.0.0.3"),
        },
    )
    assert hosts(result) == ["mx1.example.test"]


def test_self_is_recognised_by_an_alias() -> None:
    result = route(
        mx((10, "mx1.example.test"), (20, "RELAY.backup.test")),
        {"mx1.example.test": found("127.0.0.2")},
    )
    assert hosts(result) == ["mx1.example.test"]


def test_self_is_recognised_by_a_machine_address_under_another_name() -> None:
    result = route(
        mx((10, "mx1.example.test"), (20, "backup.example.test"), (30, "mx3.example.test")),
        {
            "mx1.example.test": found("127.0.0.2"),
            "backup.example.test": found("fd00::2"),  # this machine's address, any port
            "mx3.example.test": found("127.0.0.3"),
        },
    )
    assert hosts(result) == ["mx1.example.test"]


def test_self_is_recognised_by_any_one_of_an_mx_hosts_addresses() -> None:
    result = route(
        mx((10, "mx1.example.test"), (20, "backup.example.test")),
        {
            "mx1.example.test": found("127.0.0.2"),
            "backup.example.test": found("2001:db8::9", "198.51.100.9", "::ffff:192.0.2.2"),
        },
    )
    assert hosts(result) == ["mx1.example.test"]


def test_a_loopback_address_is_self_only_when_we_listen_on_it_with_that_port() -> None:
    identity = Identity.of("mx2.backup.test", [], [HostPort("127.0.0.1", PORT)], ["127.0.0.1"])
    answer = mx((10, "mx1.example.test"), (20, "backup.example.test"))
    result = route(
        answer,
        {"mx1.example.test": found("127.0.0.2"), "backup.example.test": found("127.0.0.1")},
        identity,
    )
    assert hosts(result) == ["mx1.example.test"]
    # The same address on another port than ours is some other MTA, not us.
    elsewhere = Identity.of("mx2.backup.test", [], [HostPort("127.0.0.1", 2525)], ["127.0.0.1"])
    result = route(
        answer,
        {"mx1.example.test": found("127.0.0.2"), "backup.example.test": found("127.0.0.1")},
        elsewhere,
    )
    assert hosts(result) == ["mx1.example.test", "backup.example.test"]


def test_a_wildcard_listener_makes_every_loopback_and_machine_address_self() -> None:
    both = [HostPort("0.0.0.0", PORT), HostPort("::", PORT)]
    identity = Identity.of("mx2.backup.test", [], both, ["192.0.2.2", "fd00::2"])
    assert identity.listens_on("127.0.0.9", PORT)
    assert identity.listens_on("::1", PORT)
    assert identity.listens_on("192.0.2.2", PORT)
    assert identity.listens_on("fd00::2", PORT)
    assert not identity.listens_on("127.0.0.9", 2525)
    assert not identity.listens_on("198.51.100.1", PORT)
    # asyncio binds [::] with IPV6_V6ONLY: it does not answer on IPv4.
    v6only = Identity.of("mx2.backup.test", [], [HostPort("::", PORT)], ["192.0.2.2"])
    assert v6only.listens_on("::1", PORT)
    assert not v6only.listens_on("127.0.0.1", PORT)
    assert not v6only.listens_on("192.0.2.2", PORT)
    v4only = Identity.of("mx2.backup.test", [], [HostPort("0.0.0.0", PORT)], [])
    assert v4only.listens_on("127.0.0.9", PORT)
    assert not v4only.listens_on("::1", PORT)


def test_primaries_on_loopback_are_not_self_just_for_being_loopback() -> None:
    result = route(
        mx((10, "mx1.example.test"), (20, "mx3.example.test")),
        {"mx1.example.test": found("127.0.0.2"), "mx3.example.test": found("::1")},
    )
    assert hosts(result) == ["mx1.example.test", "mx3.example.test"]


def test_backup_that_is_the_only_mx_defers_and_never_bounces() -> None:
    result = route(mx((20, "mx2.backup.test")), {"mx2.backup.test": found("192.0.2.2")})
    assert isinstance(result, Defer)
    assert "no MX better than this host" in result.reason
    assert "preference 20" in result.reason


def test_primary_at_our_own_preference_is_pruned_too() -> None:
    result = route(
        mx((10, "mx1.example.test"), (10, "mx2.backup.test")),
        {"mx1.example.test": found("127.0.0.2"), "mx2.backup.test": found("192.0.2.2")},
    )
    assert isinstance(result, Defer)
    assert "no MX better than this host" in result.reason


def test_every_mx_worse_than_us_is_pruned() -> None:
    result = route(
        mx(
            (5, "mx0.example.test"),
            (10, "mx2.backup.test"),
            (10, "mx1.example.test"),
            (50, "mx9.example.test"),
        ),
        {
            "mx0.example.test": found("127.0.0.5"),
            "mx1.example.test": found("127.0.0.2"),
            "mx9.example.test": found("127.0.0.9"),
        },
    )
    assert hosts(result) == ["mx0.example.test"]


def test_our_best_preference_counts_when_we_appear_twice() -> None:
    result = route(
        mx(
            (30, "mx2.backup.test"),
            (10, "mx1.example.test"),
            (20, "relay.backup.test"),
            (25, "mx3.example.test"),
        ),
        {"mx1.example.test": found("127.0.0.2"), "mx3.example.test": found("127.0.0.3")},
    )
    assert hosts(result) == ["mx1.example.test"]


# --------------------------------------------------------------------------- ordering


def test_better_preferences_come_first_whatever_the_dns_order() -> None:
    result = route(
        mx((30, "c.example.test"), (10, "a.example.test"), (20, "b.example.test")),
        {
            "a.example.test": found("127.0.0.2"),
            "b.example.test": found("127.0.0.3"),
            "c.example.test": found("127.0.0.4"),
        },
    )
    assert isinstance(result, RoutePlan)
    assert [hop.preference for hop in result.hops] == [10, 20, 30]


def test_equal_preferences_are_shuffled_deterministically_by_the_rng() -> None:
    answer = mx(
        (10, "a.example.test"),
        (10, "b.example.test"),
        (10, "c.example.test"),
        (20, "d.example.test"),
    )
    names = ["a.example.test", "b.example.test", "c.example.test", "d.example.test"]
    addresses: dict[str, AddressAnswer] = {
        name: found(f"127.0.0.{i}") for i, name in enumerate(names, start=2)
    }
    orders = {tuple(hosts(route(answer, addresses, seed=seed))) for seed in range(40)}
    assert len(orders) > 1  # the primaries at 10 share the load
    assert all(order[-1] == "d.example.test" for order in orders)
    assert all(set(order[:3]) == set(names[:3]) for order in orders)
    # Same seed, same order, whatever order DNS returned the records in.
    backwards = MxRecords(tuple(reversed(answer.records)))
    assert hosts(route(answer, addresses, seed=7)) == hosts(route(backwards, addresses, seed=7))


def test_each_hosts_addresses_are_kept_in_order_ipv6_and_ipv4() -> None:
    result = route(
        mx((10, "mx1.example.test"), (20, "mx3.example.test")),
        {"mx1.example.test": found("::1", "127.0.0.2"), "mx3.example.test": found("127.0.0.3")},
    )
    assert isinstance(result, RoutePlan)
    assert [(h.host, h.address) for h in result.hops] == [
        ("mx1.example.test", "::1"),
        ("mx1.example.test", "127.0.0.2"),
        ("mx3.example.test", "127.0.0.3"),
    ]


def test_an_address_shared_by_two_mx_hosts_is_tried_once_at_the_better_preference() -> None:
    result = route(
        mx((10, "mx1.example.test"), (20, "mx1b.example.test")),
        {"mx1.example.test": found("127.0.0.2"), "mx1b.example.test": found("127.0.0.2")},
    )
    assert isinstance(result, RoutePlan)
    assert [(h.host, h.preference) for h in result.hops] == [("mx1.example.test", 10)]


def test_a_host_listed_twice_keeps_its_better_preference() -> None:
    result = route(
        mx((30, "mx1.example.test"), (20, "mx3.example.test"), (10, "mx1.example.test")),
        {"mx1.example.test": found("127.0.0.2"), "mx3.example.test": found("127.0.0.3")},
    )
    assert hosts(result) == ["mx1.example.test", "mx3.example.test"]


def test_hops_carry_the_delivery_port() -> None:
    result = route_mx(
        "example.test",
        mx((10, "mx1.example.test")),
        {"mx1.example.test": found("127.0.0.2")},
        ME,
        2526,
        random.Random(0),
    )
    assert isinstance(result, RoutePlan)
    assert result.hops[0].port == 2526
    assert str(result.hops[0]) == "mx1.example.test[127.0.0.2]:2526"


# --------------------------------------------------------------------------- DNS outcomes


def test_no_mx_record_means_the_domain_itself_at_preference_0() -> None:
    result = route(NoData(), {"example.test": found("::1", "127.0.0.7")})
    assert result == RoutePlan(
        "example.test",
        (Hop("example.test", "::1", PORT, 0), Hop("example.test", "127.0.0.7", PORT, 0)),
        "implicit",
    )


def test_implicit_mx_that_is_this_host_defers() -> None:
    result = route(NoData(), {"example.test": found("192.0.2.2")})
    assert isinstance(result, Defer)
    assert "no MX better than this host" in result.reason


def test_implicit_mx_without_address_defers() -> None:
    result = route(NoData(), {"example.test": NoData()})
    assert isinstance(result, Defer)
    assert "implicit MX" in result.reason


def test_null_mx_bounces_556_5_1_10() -> None:
    result = route(NullMx(), {})
    assert result == Bounce(556, "5.1.10", "example.test does not accept mail (null MX, RFC 7505)")


def test_nxdomain_bounces_550_5_1_2() -> None:
    result = route(NxDomain(), {})
    assert isinstance(result, Bounce)
    assert (result.code, result.status) == (550, "5.1.2")
    assert "does not exist" in result.reason


@pytest.mark.parametrize("reason", ["MX lookup of example.test: SERVFAIL", "timed out"])
def test_servfail_and_timeout_defer(reason: str) -> None:
    result = route(TempFail(reason), {})
    assert result == Defer(f"DNS: {reason}")


def test_nxdomain_of_a_backed_up_domain_holds_its_mail_and_says_dns() -> None:
    result = route_mx("example.test", NxDomain(), {}, ME, PORT, random.Random(0), backed_up=True)
    assert result == Defer("DNS: MX lookup of example.test: no such domain (NXDOMAIN)")
    assert result.reason.startswith(DNS_FAILURE)


def test_null_mx_of_a_backed_up_domain_still_bounces() -> None:
    result = route_mx("example.test", NullMx(), {}, ME, PORT, random.Random(0), backed_up=True)
    assert isinstance(result, Bounce)
    assert (result.code, result.status) == (556, "5.1.10")


def test_mx_hosts_that_do_not_resolve_are_skipped() -> None:
    result = route(
        mx((10, "gone.example.test"), (10, "slow.example.test"), (20, "mx3.example.test")),
        {
            "gone.example.test": NxDomain(),
            "slow.example.test": TempFail("A lookup of slow.example.test: SERVFAIL"),
            "mx3.example.test": found("127.0.0.3"),
        },
    )
    assert hosts(result) == ["mx3.example.test"]


def test_no_mx_host_with_an_address_defers_and_never_bounces() -> None:
    result = route(
        mx((10, "gone.example.test"), (20, "slow.example.test")),
        {"gone.example.test": NxDomain(), "slow.example.test": TempFail("SERVFAIL")},
    )
    assert isinstance(result, Defer)
    assert "gone.example.test: no such host (NXDOMAIN)" in result.reason
    assert "slow.example.test: SERVFAIL" in result.reason


def test_a_root_target_among_other_mx_records_is_ignored() -> None:
    result = route(mx((0, ""), (10, "mx1.example.test")), {"mx1.example.test": found("127.0.0.2")})
    assert hosts(result) == ["mx1.example.test"]


# --------------------------------------------------------------------------- static primaries


def test_static_primaries_are_used_in_order_with_their_ports() -> None:
    result = route_static(
        "Example.Test",
        [HostPort("127.0.0.1", 2526), HostPort("mx1.example.test", 25), HostPort("::1", 2527)],
        {"mx1.example.test": found("127.0.0.2", "127.0.0.3")},
        ME,
    )
    assert result == RoutePlan(
        "example.test",
        (
            Hop("127.0.0.1", "127.0.0.1", 2526, 0),
            Hop("mx1.example.test", "127.0.0.2", 25, 1),
            Hop("mx1.example.test", "127.0.0.3", 25, 1),
            Hop("::1", "::1", 2527, 2),
        ),
        "static",
    )


def test_static_primaries_are_not_pruned_by_the_machines_addresses() -> None:
    # The operator named the port: only an endpoint we listen on is us.
    result = route_static("example.test", [HostPort("192.0.2.2", 2526)], {}, ME)
    assert isinstance(result, RoutePlan)


@pytest.mark.parametrize(
    "entry",
    [HostPort("127.0.0.1", 2525), HostPort("::1", 2525), HostPort("mx2.backup.test", 2526)],
)
def test_a_static_primary_that_is_this_host_defers(entry: HostPort) -> None:
    result = route_static(
        "example.test", [HostPort("127.0.0.2", 25), entry], {"mx2.backup.test": NoData()}, ME
    )
    assert isinstance(result, Defer)
    assert "is this host" in result.reason


def test_a_static_primary_resolving_to_our_listen_address_defers() -> None:
    result = route_static(
        "example.test",
        [HostPort("loop.example.test", 2525)],
        {"loop.example.test": found("127.0.0.1")},
        ME,
    )
    assert isinstance(result, Defer)
    assert "is this host" in result.reason


def test_static_primaries_without_address_defer() -> None:
    result = route_static(
        "example.test",
        [HostPort("gone.example.test", 25)],
        {"gone.example.test": NxDomain()},
        ME,
    )
    assert isinstance(result, Defer)
    assert "static primary" in result.reason


async def test_plan_uses_static_primaries_with_the_delivery_port_as_default() -> None:
    resolver = Resolver([HostPort("127.0.0.1", 9)], timeout=0.5)  # never asked: IP literals
    result = await plan(
        "example.test", resolver, ME, ["127.0.0.2", "[::1]:2526"], 2600, random.Random(0)
    )
    assert isinstance(result, RoutePlan)
    assert [(h.address, h.port) for h in result.hops] == [("127.0.0.2", 2600), ("::1", 2526)]


async def test_a_static_primary_is_not_affected_by_the_domains_own_mx_lookup() -> None:
    class NoSuchDomain:
        """A resolver whose every MX lookup is NXDOMAIN: a static route never asks it."""

        async def mx(self, domain: str) -> NxDomain:
            return NxDomain()

    result = await plan(
        "gone.test",
        NoSuchDomain(),
        ME,
        ["127.0.0.2:2526"],
        25,
        random.Random(0),
        True,  # type: ignore[arg-type]
    )
    assert isinstance(result, RoutePlan)
    assert result.source == "static"


async def test_plan_defers_a_malformed_static_primary() -> None:
    resolver = Resolver([HostPort("127.0.0.1", 9)], timeout=0.5)
    result = await plan("example.test", resolver, ME, ["[mx1]:25"], 25, random.Random(0))
    assert isinstance(result, Defer)


# --------------------------------------------------------------------------- identity


def test_identity_normalises_names_and_drops_loopback_from_machine_addresses() -> None:
    assert ME.names == {"mx2.backup.test", "relay.backup.test"}
    assert ME.addresses == {"192.0.2.2", "fd00::2"}
    assert ME.listen == {HostPort("127.0.0.1", 2525), HostPort("::1", 2525)}
