"""The anvil: connection counts shared by every receiver worker, exact and idempotent."""

from __future__ import annotations

from backupmx.config import Limits
from backupmx.mail import replies
from backupmx.receive.anvil import Anvil

LIMITS = Limits(max_connections=5, max_connections_per_ip=2)


def anvil() -> Anvil:
    return Anvil(lambda: LIMITS)


def test_the_per_address_limit_counts_every_worker() -> None:
    counts = anvil()
    assert counts.admit(0, "a", "192.0.2.1") is None
    assert counts.admit(1, "b", "192.0.2.1") is None
    assert counts.admit(1, "c", "192.0.2.1") == replies.TOO_MANY_FROM_ADDRESS
    assert counts.admit(0, "d", "192.0.2.2") is None
    assert counts.open == 3 and counts.open_from("192.0.2.1") == 2


def test_the_total_limit_counts_every_worker() -> None:
    counts = anvil()
    for seat in range(5):
        assert counts.admit(seat % 2, str(seat), f"192.0.2.{seat}") is None
    assert counts.admit(0, "6", "192.0.2.99") == replies.TOO_MANY_CONNECTIONS


def test_leaving_twice_or_unseated_gives_back_nothing_more() -> None:
    counts = anvil()
    counts.admit(0, "a", "192.0.2.1")
    counts.admit(1, "b", "192.0.2.1")
    counts.leave(0, "a")
    counts.leave(0, "a")
    counts.leave(0, "never-admitted")
    counts.leave(1, "a")  # the same seat name on another worker is another seat
    assert counts.open_from("192.0.2.1") == 1
    assert counts.admit(0, "c", "192.0.2.1") is None
    assert counts.admit(0, "d", "192.0.2.1") == replies.TOO_MANY_FROM_ADDRESS


def test_a_refused_seat_is_not_counted() -> None:
    counts = anvil()
    counts.admit(0, "a", "192.0.2.1")
    counts.admit(0, "b", "192.0.2.1")
    counts.admit(0, "c", "192.0.2.1")  # refused
    counts.leave(0, "a")
    assert counts.open_from("192.0.2.1") == 1


def test_a_proxy_header_moves_the_seat_to_the_real_client() -> None:
    counts = anvil()
    assert counts.admit(0, "a", "10.0.0.1") is None  # the balancer
    assert counts.admit(0, "a", "192.0.2.1") is None  # readmitted as the client
    assert counts.open == 1
    assert counts.open_from("10.0.0.1") == 0 and counts.open_from("192.0.2.1") == 1


def test_a_worker_that_died_gives_back_all_its_seats() -> None:
    counts = anvil()
    counts.admit(0, "a", "192.0.2.1")
    counts.admit(0, "b", "192.0.2.2")
    counts.admit(1, "c", "192.0.2.1")
    assert counts.receiver_gone(0) == 2
    assert counts.open == 1 and counts.open_from("192.0.2.1") == 1


def test_while_serve_stops_every_admission_is_refused() -> None:
    counts = anvil()
    counts.draining = True
    assert counts.admit(0, "a", "192.0.2.1") == replies.SHUTTING_DOWN
    assert counts.open == 0
