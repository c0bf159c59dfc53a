"""A backupmx with client checks on: the DNSBL zone it asks, its config, PROXY v2 headers.

`ZONE` is the dnsmasq zone (tests/support/dns_server.py) of RFC 5782's test
entries: 127.0.0.2 is listed on ``dnsbl.test`` and on ``half.test``, 127.0.0.3
on ``half.test`` only, and 127.0.0.4 answers ``dnsbl.test`` with an error code.
`GuardedServer` is a `ServerProcess` that also writes ``[[dnsbl.zone]]`` tables;
`v2_header` builds the PROXY protocol v2 header a load balancer sends first.
"""

from __future__ import annotations

import socket
import struct

from tests.support.server import ServerProcess

ZONE = """\
host-record=2.0.0.127.dnsbl.test,127.0.0.2
host-record=4.0.0.127.dnsbl.test,127.255.255.254
host-record=2.0.0.127.half.test,127.0.0.2
host-record=3.0.0.127.half.test,127.0.0.2
"""


class GuardedServer(ServerProcess):
    """backupmx with [[dnsbl.zone]] tables, which `write_config` does not know."""

    zones = (("dnsbl.test", 1.0), ("half.test", 0.5), ("timeout.test", 1.0))

    def write_config(self) -> None:
        super().write_config()
        with self.config_path.open("a") as file:
            for name, weight in self.zones:
                file.write(f'\n[[dnsbl.zone]]\nname = "{name}"\nweight = {weight}\n')


def v2_header(source: str | None, command: int = 1) -> bytes:
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    if source is None:
        return signature + bytes([0x20 | command, 0x00]) + struct.pack("!H", 0)
    payload = (
        socket.inet_aton(source) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 40000, 25)
    )
    return signature + bytes([0x20 | command, 0x11]) + struct.pack("!H", len(payload)) + payload
