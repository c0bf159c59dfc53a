"""This machine's own addresses, as route planning sees them, against what iproute2's
`ip addr` lists (the program is run, so this is not a unit test).

`local_addresses` reads /proc; every address `ip -o addr show` prints must be in
it, loopback included.  Route planning with those addresses written out as data
is in tests/unit/test_route.py.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from backupmx.deliver.route import local_addresses


def test_local_addresses_include_loopback_and_every_interface_address() -> None:
    addresses = local_addresses()
    assert {"127.0.0.1", "::1"} <= addresses
    ip = shutil.which("ip")
    if ip is None:
        pytest.skip("iproute2 is not installed: nothing to compare with")
    listing = subprocess.run([ip, "-o", "addr", "show"], capture_output=True, text=True, check=True)
    for line in listing.stdout.splitlines():
        words = line.split()
        family = words.index("inet") if "inet" in words else words.index("inet6")
        assert words[family + 1].split("/")[0] in addresses, line
