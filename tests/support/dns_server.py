"""A real DNS server for the integration tests: dnsmasq (Debian's dnsmasq-base) on loopback.

`dns_zone` starts two dnsmasq processes and stops them on exit:

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

Start-up waits (at most `START_SECONDS`) until the server answers a query; a
server that exits or stays silent raises RuntimeError with its stderr.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.query

from backupmx.mail.hosts import HostPort
from tests.support.ports import free_port
from tests.support.waiting import ProcessExited, wait_while_running

DNSMASQ = "/usr/sbin/dnsmasq"
START_SECONDS = 10.0
# The root zone's KSK-2017 (as in /usr/share/dnsmasq-base/trust-anchors.conf).
ROOT_ANCHOR = ".,20326,8,2,E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D"

SERVFAIL_ZONE = """\
local=/servfail.invalid/
mx-host=servfail.invalid,mx.servfail.invalid,10
host-record=mx.servfail.invalid,127.0.0.8
"""


@dataclass
class Dnsmasq:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def address(self) -> HostPort:
        return HostPort("127.0.0.1", self.port)

    @property
    def nameserver(self) -> str:
        """As backupmx's ``dns.nameservers`` wants it."""
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_dnsmasq(directory: Path, name: str, config: str) -> Dnsmasq:
    """One dnsmasq on 127.0.0.1:<free port> with `config` as its only configuration."""
    port = free_port()
    conf = directory / f"{name}.conf"
    conf.write_text(config)
    log = directory / f"{name}.log"
    process = subprocess.Popen(
        [
            DNSMASQ,
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            f"--port={port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            f"--conf-file={conf}",
            f"--pid-file={directory / name}.pid",
            "--log-queries",
            f"--log-facility={log}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    server = Dnsmasq(process, port, log)
    probe = dns.message.make_query("probe.invalid", "A")

    def answers() -> bool:
        try:
            dns.query.udp(probe, "127.0.0.1", port=port, timeout=0.2)
        except (dns.exception.Timeout, OSError):
            return False
        return True

    try:
        wait_while_running(
            process, answers, START_SECONDS, f"dnsmasq ({name}) to answer", interval=0.05
        )
    except ProcessExited:
        error = process.stderr.read().decode() if process.stderr else ""
        raise RuntimeError(f"dnsmasq ({name}) exited: {error}") from None
    except TimeoutError:
        server.stop()
        raise RuntimeError(f"dnsmasq ({name}) did not answer on 127.0.0.1:{port}") from None
    return server


@contextmanager
def dns_zone(directory: Path, zone: str) -> Iterator[Dnsmasq]:
    """The front server with `zone` (dnsmasq syntax), SERVFAIL and timeout set up as above."""
    upstream = start_dnsmasq(directory, "upstream", SERVFAIL_ZONE)
    try:
        closed = free_port()  # nothing listens here: queries forwarded to it are never answered
        front = start_dnsmasq(
            directory,
            "front",
            "\n".join(
                [
                    zone,
                    f"server=/timeout.test/127.0.0.1#{closed}",
                    f"server=127.0.0.1#{upstream.port}",
                    "dnssec",
                    f"trust-anchor={ROOT_ANCHOR}",
                    "",
                ]
            ),
        )
        try:
            yield front
        finally:
            front.stop()
    finally:
        upstream.stop()
