"""`Resolver`'s own checks, pure: a resolver is built, no query is sent.

Its answers to real queries are tested against dnsmasq in
tests/integration/test_resolver_dnsmasq.py.
"""

from __future__ import annotations

import pytest

from backupmx.mail.hosts import HostPort
from backupmx.resolver import Resolver


def test_a_nameserver_must_be_an_address() -> None:
    with pytest.raises(ValueError):
        Resolver([HostPort("ns1.example.test", 53)], timeout=1.0)
