"""`Resolver` and `plan` against a real DNS server: dnsmasq (Debian's dnsmasq-base) on loopback.

Two dnsmasq processes are started for the module and stopped after it:

* the *front* server answers the tests.  ``local=/test/`` makes it authoritative
  for ``*.test``: names it was given answer with their records, other types of
  those names with NODATA, unknown names with NXDOMAIN.  ``timeout.test`` is
  forwarded to a closed port, so nothing ever answers it.
* the *upstream* server holds the ``servfail.invalid`` zone, unsigned.  The front
  server forwards every other name to it with DNSSEC validation on and the root
  trust anchor: an unsigned answer cannot be validated, and dnsmasq turns it into
  SERVFAIL at once.  Names upstream does not know come back REFUSED.

dnsmasq cannot forward to itself ("ignoring nameserver - local interface") and
answers nothing for a dead upstream, hence the second process for SERVFAIL.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest

from backupmx.deliver.route import Bounce, Defer, Hop, Identity, RoutePlan, plan
from backupmx.mail.hosts import HostPort
from backupmx.resolver import (
    Addresses,
    MxRecord,
    MxRecords,
    NoData,
    NullMx,
    NxDomain,
    Resolver,
    TempFail,
)
from tests.support.dns_server import Dnsmasq, dns_zone
from tests.support.ports import free_port

FRONT_ZONE = """\
local=/test/
mx-host=example.test,MX1.Example.Test,10
mx-host=example.test,mx3.example.test,10
mx-host=example.test,mx2.backup.test,20
host-record=mx1.example.test,127.0.0.2
host-record=mx3.example.test,127.0.0.3,::1
host-record=mx2.backup.test,127.0.0.1
mx-host=only-backup.test,mx2.backup.test,10
mx-host=backup-by-address.test,mx1.example.test,10
mx-host=backup-by-address.test,other-name.example.test,20
host-record=other-name.example.test,127.0.0.1
mx-host=nullmx.test,.,0
host-record=implicit.test,127.0.0.4,::1
cname=alias.example.test,mx1.example.test
mx-host=alias-mx.test,alias.example.test,10
mx-host=dangling.test,gone.example.test,10
"""

BACKUP = Identity.of("mx2.backup.test", [], [HostPort("127.0.0.1", 25)], ["127.0.0.1"])


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    with dns_zone(tmp_path_factory.mktemp("dnsmasq"), FRONT_ZONE) as front:
        yield front


@pytest.fixture
def resolver(dnsmasq: Dnsmasq) -> Resolver:
    return Resolver([dnsmasq.address], timeout=2.0)


# --------------------------------------------------------------------------- Resolver.mx


async def test_mx_records_come_back_lower_case_without_trailing_dot(resolver: Resolver) -> None:
    answer = await resolver.mx("example.test")
    assert isinstance(answer, MxRecords)
    assert sorted(answer.records, key=lambda r: (r.preference, r.host)) == [
        MxRecord(10, "mx1.example.test"),
        MxRecord(10, "mx3.example.test"),
        MxRecord(20, "mx2.backup.test"),
    ]


async def test_a_trailing_dot_and_upper_case_in_the_query_do_not_matter(
    resolver: Resolver,
) -> None:
    assert await resolver.mx("Example.TEST.") == await resolver.mx("example.test")


async def test_null_mx_is_recognised(resolver: Resolver) -> None:
    assert await resolver.mx("nullmx.test") == NullMx()


async def test_a_domain_with_an_address_but_no_mx_is_nodata(resolver: Resolver) -> None:
    assert await resolver.mx("implicit.test") == NoData()


async def test_a_missing_domain_is_nxdomain(resolver: Resolver) -> None:
    assert await resolver.mx("nx.test") == NxDomain()


async def test_servfail_is_a_temporary_failure(resolver: Resolver) -> None:
    answer = await resolver.mx("servfail.invalid")
    assert isinstance(answer, TempFail)
    assert "SERVFAIL" in answer.reason


async def test_refused_is_a_temporary_failure(resolver: Resolver) -> None:
    answer = await resolver.mx("unknown.invalid")
    assert isinstance(answer, TempFail)
    assert "REFUSED" in answer.reason


async def test_a_silent_server_times_out_within_the_configured_timeout(dnsmasq: Dnsmasq) -> None:
    resolver = Resolver([dnsmasq.address], timeout=0.5)
    started = time.monotonic()
    answer = await resolver.mx("timeout.test")
    assert isinstance(answer, TempFail)
    assert "timed out" in answer.reason
    assert time.monotonic() - started < 1.5


async def test_a_nameserver_that_is_not_running_is_a_temporary_failure() -> None:
    resolver = Resolver([HostPort("127.0.0.1", free_port())], timeout=0.3)
    assert isinstance(await resolver.mx("example.test"), TempFail)
    assert isinstance(await resolver.addresses("mx1.example.test"), TempFail)


# --------------------------------------------------------------------------- Resolver.addresses


async def test_addresses_include_ipv6_first_and_ipv4(resolver: Resolver) -> None:
    assert await resolver.addresses("mx3.example.test") == Addresses(("::1", "127.0.0.3"))


async def test_addresses_follow_a_cname(resolver: Resolver) -> None:
    assert await resolver.addresses("alias.example.test") == Addresses(("127.0.0.2",))


async def test_a_name_without_addresses_is_nodata(resolver: Resolver) -> None:
    assert await resolver.addresses("example.test") == NoData()


async def test_a_missing_host_is_nxdomain(resolver: Resolver) -> None:
    assert await resolver.addresses("gone.example.test") == NxDomain()


async def test_address_servfail_is_a_temporary_failure(resolver: Resolver) -> None:
    answer = await resolver.addresses("mx.servfail.invalid")
    assert isinstance(answer, TempFail)
    assert "SERVFAIL" in answer.reason


async def test_a_malformed_name_is_nxdomain_not_an_exception(resolver: Resolver) -> None:
    assert await resolver.addresses("a..example.test") == NxDomain()
    assert await resolver.mx("x" * 64 + ".test") == NxDomain()


# --------------------------------------------------------------------------- plan, end to end


async def route(resolver: Resolver, domain: str, static: list[str] | None = None) -> object:
    return await plan(domain, resolver, BACKUP, static or [], 25, random.Random(1))


async def test_plan_sends_to_the_primaries_and_never_to_this_backup(resolver: Resolver) -> None:
    result = await route(resolver, "example.test")
    assert isinstance(result, RoutePlan)
    assert result.source == "mx"
    assert {(h.host, h.address) for h in result.hops} == {
        ("mx1.example.test", "127.0.0.2"),
        ("mx3.example.test", "::1"),
        ("mx3.example.test", "127.0.0.3"),
    }
    assert all(h.preference == 10 and h.port == 25 for h in result.hops)


async def test_plan_defers_when_this_backup_is_the_only_mx(resolver: Resolver) -> None:
    result = await route(resolver, "only-backup.test")
    assert isinstance(result, Defer)
    assert "no MX better than this host" in result.reason


async def test_plan_recognises_this_backup_by_address(resolver: Resolver) -> None:
    result = await route(resolver, "backup-by-address.test")
    assert isinstance(result, RoutePlan)
    assert result.hops == (Hop("mx1.example.test", "127.0.0.2", 25, 10),)


async def test_plan_uses_the_implicit_mx(resolver: Resolver) -> None:
    result = await route(resolver, "implicit.test")
    assert result == RoutePlan(
        "implicit.test",
        (Hop("implicit.test", "::1", 25, 0), Hop("implicit.test", "127.0.0.4", 25, 0)),
        "implicit",
    )


async def test_plan_follows_an_mx_host_that_is_a_cname(resolver: Resolver) -> None:
    result = await route(resolver, "alias-mx.test")
    assert isinstance(result, RoutePlan)
    assert result.hops == (Hop("alias.example.test", "127.0.0.2", 25, 10),)


async def test_plan_bounces_null_mx_and_nxdomain(resolver: Resolver) -> None:
    assert await route(resolver, "nullmx.test") == Bounce(
        556, "5.1.10", "nullmx.test does not accept mail (null MX, RFC 7505)"
    )
    result = await route(resolver, "nx.test")
    assert isinstance(result, Bounce)
    assert (result.code, result.status) == (550, "5.1.2")


async def test_plan_defers_on_servfail_and_on_a_dangling_mx(resolver: Resolver) -> None:
    servfail = await route(resolver, "servfail.invalid")
    assert isinstance(servfail, Defer)
    assert "SERVFAIL" in servfail.reason
    dangling = await route(resolver, "dangling.test")
    assert isinstance(dangling, Defer)
    assert "gone.example.test: no such host" in dangling.reason


async def test_plan_resolves_static_primaries_by_name(resolver: Resolver) -> None:
    result = await route(resolver, "example.test", ["mx3.example.test:2526", "127.0.0.9"])
    assert isinstance(result, RoutePlan)
    assert result.source == "static"
    assert [(h.address, h.port, h.preference) for h in result.hops] == [
        ("::1", 2526, 0),
        ("127.0.0.3", 2526, 0),
        ("127.0.0.9", 25, 1),
    ]


async def test_plan_refuses_a_static_primary_that_resolves_to_this_backup(
    resolver: Resolver,
) -> None:
    result = await route(resolver, "example.test", ["other-name.example.test"])
    assert isinstance(result, Defer)
    assert "is this host" in result.reason
