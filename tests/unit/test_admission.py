"""Specification of the refusal decision (`backupmx.receive.admission`): which new
connection is greeted and which gets a 421, from the counts alone."""

from __future__ import annotations

from backupmx.config import Limits
from backupmx.receive.admission import refusal

LIMITS = Limits(max_connections=3, max_connections_per_ip=2)


def test_a_connection_under_both_limits_is_admitted() -> None:
    assert refusal(LIMITS, draining=False, open_total=2, open_from_client=1) is None


def test_a_draining_server_refuses_every_connection_with_421_4_3_2() -> None:
    assert refusal(LIMITS, draining=True, open_total=0, open_from_client=0) == (
        "421 4.3.2 Service shutting down, try again later"
    )


def test_the_server_wide_limit_counts_every_client() -> None:
    assert refusal(LIMITS, draining=False, open_total=3, open_from_client=0) == (
        "421 4.7.0 Error: too many connections, try again later"
    )


def test_the_per_address_limit_counts_only_that_client() -> None:
    assert refusal(LIMITS, draining=False, open_total=2, open_from_client=2) == (
        "421 4.7.0 Error: too many connections from your address"
    )


def test_draining_is_named_before_a_full_server() -> None:
    reply = refusal(LIMITS, draining=True, open_total=3, open_from_client=2)
    assert reply is not None and reply.startswith("421 4.3.2")


def test_the_server_wide_limit_is_named_before_the_per_address_one() -> None:
    reply = refusal(LIMITS, draining=False, open_total=3, open_from_client=2)
    assert reply == "421 4.7.0 Error: too many connections, try again later"


def test_every_refusal_is_a_421_that_ends_the_session() -> None:
    for draining, total, mine in [(True, 0, 0), (False, 3, 0), (False, 0, 2)]:
        reply = refusal(LIMITS, draining=draining, open_total=total, open_from_client=mine)
        assert reply is not None and reply.startswith("421 ")
