"""Cluster benchmark: one versus two ``backupmx serve`` nodes on one PostgreSQL queue.

What is measured
    * accept: the durable accept rate (msg/s) of 1 and of 2 nodes.  Postfix's
      ``smtp-source`` sends ``--accept-messages`` messages of 10 KiB over
      ``--sessions`` sessions in all, split evenly over the nodes (one
      smtp-source per node, at the same time), one connection per message
      unless ``--reuse-connections``.  The primary (``127.0.0.1:9``) refuses
      connections, so everything stays queued; msg/s = messages in the queue
      afterwards / wall-clock time of the load.  Median of ``--repeat`` runs,
      1 and 2 nodes interleaved.
    * flush: a backlog of ``--messages`` (10,000) held 10 KiB messages, spread
      over the nodes by smtp-source while the primary is down.  Once the shared
      queue says the primary is down, the primary (the tests'
      `CountingPrimary`, in a thread of this process) comes up; measured from
      then: the first message at the primary, every message at the primary,
      nothing pending in the queue.  Also: duplicates (Message-IDs accepted
      twice), the most delivering sessions open at once against
      ``max_connections_per_host`` = ``--connections`` (a limit of the cluster
      as a whole), and how many messages each node sent.  One run per count
      of nodes (``--flush-repeat`` for more; medians are shown).
    * takeover: two nodes flush ``--takeover-messages`` to a slow primary
      (``--takeover-delay`` seconds per message) with ``lease = --lease``;
      once one node has sent 20 and holds leases it is killed (SIGKILL).
      Measured from the kill: the survivor's ``leases_taken_over`` (its log
      timestamp), the survivor's first delivery of a recipient the dead node
      held (its ``message_delivered``), and the end of the flush; plus the
      duplicates (RFC 5321 §6.1: sent by the dead node, not recorded).
      Median of ``--repeat`` runs.

How
    Every run gets a fresh PostgreSQL database (``--postgres ADMIN_URL``,
    default ``$BACKUPMX_TEST_POSTGRES`` or ``postgresql://postgres@127.0.0.1:5432/postgres``;
    created and dropped with ``WITH (FORCE)``) and fresh nodes from the tests'
    harness (`tests.support.cluster.Cluster`: each node its own directory,
    listen port, metrics port and ``hostname``, probes every second).  Only
    loopback addresses are used.

Run from the repository root::

    .venv/bin/python bench/cluster.py                  # all three, full size
    .venv/bin/python bench/cluster.py --quick          # a smoke run: small counts, one run
    .venv/bin/python bench/cluster.py --only flush --messages 5000

Progress goes to stderr, the figures to stdout.  Every phase is bounded by
``--timeout`` seconds; nodes, the primary, the databases and the temporary
directories are removed on exit, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from accept import KIB, REPO_ROOT, check_primary_closed, sigterm_as_exit, smtp_source_command
from postfix_backup import ServerError

sys.path.insert(0, str(REPO_ROOT))
from tests.support.cluster import (  # the tests' cluster harness
    Cluster,
    Node,
    event_time,
    leases,
    pending,
    query,
)
from tests.support.counting_primary import CountingPrimary
from tests.support.server import POSTGRES_ADMIN_URL, ServerProcess

MESSAGE_SIZE: Final = 10 * KIB
ACCEPT_MESSAGES: Final = 3000
FLUSH_MESSAGES: Final = 10_000
TAKEOVER_MESSAGES: Final = 1000
QUICK: Final = {"accept_messages": 300, "messages": 1000, "takeover_messages": 300, "repeat": 1}
SESSIONS: Final = 20
CONNECTIONS: Final = 20
LEASE: Final = "5s"
TAKEOVER_DELAY: Final = 0.1
KILL_AFTER: Final = 20  # the victim has delivered this many before the kill
CLOSED_PRIMARY: Final = "127.0.0.1:9"
NODE_STOP_SECONDS: Final = 40.0


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ServerError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- set-up


@contextmanager
def database(admin: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one run, dropped afterwards."""
    import psycopg

    name = f"backupmx_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def nodes(count: int, url: str, primary: str, delivery: dict[str, Any]) -> Iterator[Cluster]:
    """`count` started nodes on `url`; stopped (SIGTERM, then SIGKILL) and removed after."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    made: list[ServerProcess] = []

    def make(**settings: Any) -> ServerProcess:
        directory = workdir / f"node{len(made)}"
        directory.mkdir()
        server = ServerProcess(directory, **settings)
        made.append(server)
        return server

    try:
        cluster = Cluster(make, url, primary, count, delivery=delivery)
        cluster.start()
        yield cluster
    except Exception:
        for server in made:
            tail = "\n".join(server.log().splitlines()[-15:])
            progress(f"--- {server.settings['hostname']}\n{tail}")
        raise
    finally:
        for server in made:
            if server.process is not None:
                with suppress(subprocess.TimeoutExpired):
                    server.stop(NODE_STOP_SECONDS)
        shutil.rmtree(workdir, ignore_errors=True)


def inject(cluster: Cluster, messages: int, sessions: int, *, reuse: bool, timeout: float) -> float:
    """smtp-source against every node at once, messages and sessions split evenly;
    the wall-clock seconds until the last one finished."""
    count = len(cluster)
    procs: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    try:
        for n, node in enumerate(cluster):
            share = messages // count + (1 if n < messages % count else 0)
            command = smtp_source_command(
                node.server.port,
                sessions=max(sessions // count, 1),
                messages=share,
                size=MESSAGE_SIZE,
                reuse=reuse,
            )
            procs.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            )
        for proc in procs:
            proc.wait(max(started + timeout - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        raise ServerError(f"smtp-source did not finish within {timeout:.0f} s") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    elapsed = time.monotonic() - started
    for proc in procs:
        error = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.returncode != 0:
            raise ServerError(f"smtp-source exited {proc.returncode}: {error[-300:]}")
    return elapsed


def held(url: str) -> int:
    return int(query(url, "SELECT count(*) FROM messages")[0][0])


def primary_down(url: str) -> bool:
    return bool(query(url, "SELECT count(*) FROM domains WHERE state = 'down'")[0][0])


def flush_delivery(opts: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    return {
        "max_connections_per_host": opts.connections,
        "initial_connections_per_host": opts.connections,
        "max_messages_per_second_per_host": 0,
        **extra,
    }


# --------------------------------------------------------------------------- accept


@dataclass
class Accept:
    nodes: int
    rates: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0


def accept_run(count: int, opts: argparse.Namespace, result: Accept) -> None:
    with database(opts.postgres) as url, nodes(count, url, CLOSED_PRIMARY, {}) as cluster:
        elapsed = inject(
            cluster, opts.accept_messages, opts.sessions, reuse=opts.reuse, timeout=opts.timeout
        )
        stored = held(url)
    if stored != opts.accept_messages:
        result.problems.append(f"held {stored} of {opts.accept_messages}")
    result.rates.append(stored / elapsed)
    progress(f"accept, {count} node(s): {stored} held in {elapsed:.1f} s")


# --------------------------------------------------------------------------- flush


@dataclass(frozen=True)
class Flush:
    nodes: int
    inject_seconds: float
    first_seconds: float  # primary up -> first message at the primary
    primary_seconds: float  # primary up -> every message at the primary
    flush_seconds: float  # primary up -> nothing pending in the queue
    duplicates: int
    max_delivering: int
    by_node: dict[str, int]

    @property
    def rate(self) -> float:
        return 0.0 if self.flush_seconds <= 0 else sum(self.by_node.values()) / self.flush_seconds


def flush_run(count: int, opts: argparse.Namespace) -> Flush:
    messages = opts.messages
    with (
        database(opts.postgres) as url,
        CountingPrimary() as primary,
        nodes(count, url, primary.address, flush_delivery(opts)) as cluster,
    ):
        progress(f"flush, {count} node(s): injecting {messages} messages, primary down")
        injected = inject(cluster, messages, opts.sessions, reuse=True, timeout=opts.timeout)
        wait_until(lambda: held(url) == messages, opts.timeout, "every message held", 0.2)
        wait_until(lambda: primary_down(url), opts.timeout, "the primary known down", 0.2)
        primary.name_nodes(cluster.pids())
        progress(f"flush, {count} node(s): primary up")
        started = time.monotonic()
        primary.start()
        wait_until(lambda: primary.total, opts.timeout, "the first delivery", 0.005)
        first = time.monotonic() - started
        wait_until(lambda: primary.unique() >= messages, opts.timeout, "every message", 0.05)
        at_primary = time.monotonic() - started
        wait_until(lambda: pending(url) == 0, opts.timeout, "an empty queue", 0.1)
        flushed = time.monotonic() - started
        by_node = {str(k): v for k, v in primary.delivered_by_node().items()}
        return Flush(
            count,
            injected,
            first,
            at_primary,
            flushed,
            len(primary.duplicates()),
            primary.max_delivering,
            by_node,
        )


# --------------------------------------------------------------------------- takeover


@dataclass(frozen=True)
class Takeover:
    held: int  # recipients the victim held at the kill
    taken: int  # what leases_taken_over said
    takeover_seconds: float  # kill -> leases_taken_over
    resumed_seconds: float  # kill -> the survivor delivered one of the victim's recipients
    finished_seconds: float  # kill -> nothing pending
    duplicates: int


def busy_node(cluster: Cluster, url: str) -> Node | None:
    held_now = leases(url)
    for node in cluster:
        if len(node.delivered()) >= KILL_AFTER and held_now.get(node.name, 0) > 0:
            return node
    return None


def takeover_run(opts: argparse.Namespace) -> Takeover:
    messages = opts.takeover_messages
    delivery = flush_delivery(opts, lease=opts.lease)
    with (
        database(opts.postgres) as url,
        CountingPrimary(delay=opts.takeover_delay) as primary,
        nodes(2, url, primary.address, delivery) as cluster,
    ):
        inject(cluster, messages, opts.sessions, reuse=True, timeout=opts.timeout)
        wait_until(lambda: held(url) == messages, opts.timeout, "every message held", 0.2)
        primary.name_nodes(cluster.pids())
        primary.start()
        victim: Node = wait_until(
            lambda: busy_node(cluster, url), opts.timeout, "a node delivering", 0.05
        )
        survivor = next(node for node in cluster if node is not victim)
        owner = victim.name.replace("'", "''")
        victims = {
            str(row[0])
            for row in query(
                url,
                "SELECT message_id FROM recipients"
                f" WHERE state = 'sending' AND lease_owner = '{owner}'",
            )
        }
        killed_at = time.time()
        victim.kill()
        progress(f"takeover: killed {victim.name} holding {len(victims)} messages")

        def taken() -> dict[str, Any] | None:
            found = [
                e for e in survivor.events("leases_taken_over") if e.get("node") == victim.name
            ]
            return found[0] if found else None

        def resumed() -> dict[str, Any] | None:
            found = [e for e in survivor.delivered() if e.get("queue_id") in victims]
            return min(found, key=event_time) if found else None

        record = wait_until(taken, opts.timeout, "leases_taken_over", 0.05)
        first = wait_until(resumed, opts.timeout, "a taken-over recipient delivered", 0.05)
        wait_until(lambda: primary.unique() >= messages, opts.timeout, "every message", 0.05)
        wait_until(lambda: pending(url) == 0, opts.timeout, "an empty queue", 0.1)
        return Takeover(
            len(victims),
            int(record.get("recipients", 0)),
            event_time(record) - killed_at,
            event_time(first) - killed_at,
            time.time() - killed_at,
            len(primary.duplicates()),
        )


# --------------------------------------------------------------------------- report


def machine(opts: argparse.Namespace) -> list[str]:
    model = "?"
    with suppress(OSError):
        found = re.search(
            r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE
        )
        model = found.group(1).strip() if found else model
    return [
        f"cpus:       {len(os.sched_getaffinity(0))} usable of {os.cpu_count()} ({model})",
        f"kernel:     {platform.system()} {platform.release()}",
        f"python:     {platform.python_version()}",
        f"postgresql: {postgres_version(opts.postgres)}",
    ]


def postgres_version(admin: str) -> str:
    import psycopg

    try:
        with psycopg.connect(admin, connect_timeout=10) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return str(row[0]) if row else "?"
    except psycopg.Error as error:
        return f"? ({error})"


def report(
    opts: argparse.Namespace,
    accepts: Sequence[Accept],
    flushes: Sequence[Flush],
    takeovers: Sequence[Takeover],
) -> str:
    lines = ["", "backupmx cluster benchmark (nodes on one PostgreSQL queue)", *machine(opts)]
    load = os.getloadavg()[0]
    lines.append(f"load avg:   {opts.load_before:.2f} before, {load:.2f} after (1 min)")
    if accepts:
        connection = "one connection per message" if not opts.reuse else "connections reused"
        lines += [
            "",
            f"accept: {opts.accept_messages} messages of {MESSAGE_SIZE // KIB} KiB, "
            f"{opts.sessions} smtp-source sessions in all ({connection}), median of "
            f"{len(accepts[0].rates)}",
            f"{'nodes':>5} {'msg/s':>9}  runs",
        ]
        for a in accepts:
            runs = ", ".join(f"{r:.0f}" for r in a.rates)
            flag = f"  ! {'; '.join(a.problems)}" if a.problems else ""
            lines.append(f"{a.nodes:>5} {a.rate:>9.1f}  {runs}{flag}")
        rates = {a.nodes: a.rate for a in accepts}
        if rates.get(1) and 2 in rates:
            lines.append(f"2 nodes / 1 node: {rates[2] / rates[1]:.2f}")
    if flushes:
        lines += [
            "",
            f"flush: {opts.messages} held {MESSAGE_SIZE // KIB} KiB messages, "
            f"max_connections_per_host = {opts.connections} for the cluster, no rate cap",
            f"{'nodes':>5} {'flush s':>8} {'msg/s':>7} {'first s':>8} {'at primary s':>13} "
            f"{'inject s':>9} {'dups':>5} {'max conns':>10}  sent by node",
        ]
        for f in flushes:
            lines.append(
                f"{f.nodes:>5} {f.flush_seconds:>8.1f} {f.rate:>7.0f} {f.first_seconds:>8.2f} "
                f"{f.primary_seconds:>13.1f} {f.inject_seconds:>9.1f} {f.duplicates:>5} "
                f"{f.max_delivering:>10}  {f.by_node}"
            )
        one = [f.flush_seconds for f in flushes if f.nodes == 1]
        two = [f.flush_seconds for f in flushes if f.nodes == 2]
        if one and two:
            ratio = statistics.median(two) / statistics.median(one)
            lines.append(f"flush time 2 nodes / 1 node: {ratio:.2f}")
    if takeovers:
        median = statistics.median
        lines += [
            "",
            f"takeover after SIGKILL: 2 nodes, lease {opts.lease}, primary at "
            f"{opts.takeover_delay:g} s per message, {opts.takeover_messages} messages, "
            f"median of {len(takeovers)}",
            f"  leases_taken_over   {median(t.takeover_seconds for t in takeovers):6.2f} s "
            f"after the kill  (runs: "
            + ", ".join(f"{t.takeover_seconds:.2f}" for t in takeovers)
            + ")",
            f"  first taken-over    {median(t.resumed_seconds for t in takeovers):6.2f} s "
            "recipient delivered by the survivor",
            f"  flush finished      {median(t.finished_seconds for t in takeovers):6.2f} s "
            "after the kill",
            "  held at the kill / taken over / duplicates (RFC 5321 §6.1): "
            + ", ".join(f"{t.held}/{t.taken}/{t.duplicates}" for t in takeovers),
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, one run: a smoke test")
    parser.add_argument(
        "--only", choices=("accept", "flush", "takeover"), action="append", help="repeatable"
    )
    parser.add_argument("--accept-messages", type=int, help=f"default {ACCEPT_MESSAGES}")
    parser.add_argument("--messages", type=int, help=f"flushed backlog, default {FLUSH_MESSAGES}")
    parser.add_argument("--takeover-messages", type=int, help=f"default {TAKEOVER_MESSAGES}")
    parser.add_argument(
        "--repeat", type=int, help="accept and takeover runs, the median is shown (default 3)"
    )
    parser.add_argument(
        "--flush-repeat", type=int, default=1, help="flush runs per count of nodes (default 1)"
    )
    parser.add_argument("--sessions", type=int, default=SESSIONS, help="smtp-source sessions")
    parser.add_argument(
        "--reuse-connections",
        dest="reuse",
        action="store_true",
        help="accept: all of a session's messages over one connection (smtp-source -d)",
    )
    parser.add_argument(
        "--connections", type=int, default=CONNECTIONS, help="max_connections_per_host"
    )
    parser.add_argument("--lease", default=LEASE, help="delivery.lease for the takeover")
    parser.add_argument(
        "--takeover-delay", type=float, default=TAKEOVER_DELAY, help="primary s per message"
    )
    parser.add_argument("--postgres", default=POSTGRES_ADMIN_URL, help="admin URL")
    parser.add_argument("--timeout", type=float, default=600.0, help="limit per phase, seconds")
    opts = parser.parse_args(argv)
    quick = QUICK if opts.quick else {}
    opts.accept_messages = opts.accept_messages or quick.get("accept_messages", ACCEPT_MESSAGES)
    opts.messages = opts.messages or quick.get("messages", FLUSH_MESSAGES)
    opts.takeover_messages = opts.takeover_messages or quick.get(
        "takeover_messages", TAKEOVER_MESSAGES
    )
    opts.repeat = opts.repeat or quick.get("repeat", 3)
    opts.only = opts.only or ["accept", "flush", "takeover"]
    names = ("accept_messages", "messages", "takeover_messages", "repeat", "flush_repeat")
    for name in (*names, "sessions", "connections"):
        if getattr(opts, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if opts.takeover_messages < 2 * KILL_AFTER:
        parser.error(f"--takeover-messages must be at least {2 * KILL_AFTER}")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if shutil.which("smtp-source") is None:
        raise SystemExit("smtp-source is needed (Debian package: postfix)")
    check_primary_closed()
    opts.load_before = os.getloadavg()[0]
    if opts.load_before > 0.5 * len(os.sched_getaffinity(0)):
        progress(f"warning: load average is {opts.load_before:.2f}; the figures will be noisy")
    accepts = [Accept(1), Accept(2)] if "accept" in opts.only else []
    flushes: list[Flush] = []
    takeovers: list[Takeover] = []
    with sigterm_as_exit():
        try:
            for _ in range(opts.repeat):
                for result in accepts:  # 1 and 2 nodes interleaved: drift hits both alike
                    accept_run(result.nodes, opts, result)
            if "flush" in opts.only:
                for _ in range(opts.flush_repeat):
                    for count in (1, 2):
                        flushes.append(flush_run(count, opts))
            if "takeover" in opts.only:
                for run in range(opts.repeat):
                    progress(f"takeover: run {run + 1} of {opts.repeat}")
                    takeovers.append(takeover_run(opts))
        except ServerError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    print(report(opts, accepts, flushes, takeovers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
