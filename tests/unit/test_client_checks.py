"""Client checks, pure: PROXY v1/v2 parsing, DNSBL query names and answers, the
greylist key, per-IP rates on a fake clock (and the bound on the clients they
remember), and the config keys of DNSBL and greylisting.

The same checks against a real `backupmx serve` and dnsmasq are in
tests/integration/test_client_checks.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from backupmx.config import Dnsbl, DnsblZone
from backupmx.receive import anvil
from backupmx.receive.anvil import ClientRates
from backupmx.receive.dnsbl import listed, query_name
from backupmx.receive.greylist import client_network
from backupmx.receive.proxy import ProxyError, parse_v1, parse_v2
from backupmx.resolver import Addresses, NxDomain
from tests.support.guarded import v2_header


def test_proxy_v1_lines() -> None:
    assert parse_v1(b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 25\r\n") == "192.0.2.1"
    assert parse_v1(b"PROXY TCP6 2001:db8::1 2001:db8::2 56324 25\r\n") == "2001:db8::1"
    assert parse_v1(b"PROXY UNKNOWN\r\n") is None
    for bad in (
        b"PROXY TCP4 2001:db8::1 192.0.2.2 1 25\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 99999 25\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 25\n",
    ):
        with pytest.raises(ProxyError):
            parse_v1(bad)


def test_proxy_v2_headers() -> None:
    header = v2_header("203.0.113.7")
    assert parse_v2(header[:16], header[16:]) == "203.0.113.7"
    local = v2_header(None, command=0)
    assert parse_v2(local[:16], local[16:]) is None
    with pytest.raises(ProxyError):
        parse_v2(header[:12] + b"\x31" + header[13:16], header[16:])  # version 3


def test_dnsbl_query_names_and_answers() -> None:
    assert query_name("192.0.2.99", "dnsbl.test") == "99.2.0.192.dnsbl.test"
    assert query_name("::ffff:127.0.0.2", "dnsbl.test") == "2.0.0.127.dnsbl.test"
    assert query_name("2001:db8::1", "z.test").startswith("1.0.0.0.0.0.0.0.") and query_name(
        "2001:db8::1", "z.test"
    ).endswith(".8.b.d.0.1.0.0.2.z.test")
    zone = DnsblZone("dnsbl.test")
    assert listed(Addresses(("127.0.0.2",)), zone)
    assert not listed(Addresses(("127.255.255.254",)), zone)  # an error code, not a listing
    assert not listed(NxDomain(), zone)
    assert not listed(Addresses(("127.0.0.2",)), DnsblZone("dnsbl.test", answers=("127.0.0.4",)))


def test_greylist_key_is_the_client_slash_24_or_slash_64() -> None:
    assert client_network("192.0.2.77") == "192.0.2.0/24"
    assert client_network("2001:db8:1:2:3::9") == "2001:db8:1:2::/64"


def test_rates_are_per_client_and_refill_over_the_minute() -> None:
    now = [0.0]
    rates = ClientRates(clock=lambda: now[0])
    assert all(rates.take("message", "192.0.2.1", 3) for _ in range(3))
    assert not rates.take("message", "192.0.2.1", 3)
    assert rates.take("message", "192.0.2.2", 3)
    now[0] = 20.0  # a third of a minute: one message back
    assert rates.take("message", "192.0.2.1", 3)
    assert not rates.take("message", "192.0.2.1", 3)
    assert rates.take("message", "192.0.2.1", 0)  # 0: no limit


def test_rates_forget_idle_clients_and_never_track_more_than_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(anvil, "MAX_TRACKED_CLIENTS", 3)
    now = [0.0]
    rates = ClientRates(clock=lambda: now[0])
    for address in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        assert rates.take("message", address, 1)
    assert len(rates) == 3
    # A flood of new addresses within the minute: the least recently seen goes.
    now[0] = 10.0
    assert not rates.take("message", "192.0.2.2", 1)  # still counted: seen more recently
    for i in range(10, 20):
        assert rates.take("message", f"2001:db8::{i}", 1)
        assert len(rates) == 3
    # A minute without a word: every bucket is full again, and none is kept.
    now[0] = 100.0
    assert rates.take("recipient", "192.0.2.9", 5)
    assert len(rates) == 1


def test_dnsbl_and_greylist_keys_are_documented_config(tmp_path: Path) -> None:
    """The TOML shape the integration tests use is what `config check` accepts."""
    from backupmx.config import load

    path = tmp_path / "c.toml"
    path.write_text(
        '[dnsbl]\nthreshold = 1.5\n[[dnsbl.zone]]\nname = "zen.example"\nweight = 2\n'
        'answers = ["127.0.0.2"]\n[greylist]\nenabled = true\npass_clients = ["192.0.2.0/24"]\n'
    )
    config = load(path)
    assert config.dnsbl == Dnsbl(
        zone=(DnsblZone("zen.example", 2.0, ("127.0.0.2",)),), threshold=1.5
    )
    assert config.greylist.enabled and config.greylist.delay == 300
