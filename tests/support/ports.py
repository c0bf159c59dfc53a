"""Free loopback ports for the servers a test starts.

The kernel may hand the same free port to two binds in a row once the first socket
is closed, and a test that asks for two ports (a server's listen and metrics
addresses) then got one port twice ("metrics.listen: must not share a port with
listen", seen once in a CI run).  So a port handed out once in this process is
not handed out again.
"""

from __future__ import annotations

import socket

_HANDED_OUT: set[tuple[str, int]] = set()


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if (host, port) not in _HANDED_OUT:
            _HANDED_OUT.add((host, port))
            return port
    raise RuntimeError(f"no port on {host} that was not handed out already")
