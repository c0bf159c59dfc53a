"""Flush of a held queue when the primary comes back: backupmx versus Postfix, and claim cost.

What is measured
    1. Flush throughput.  N held 10 KiB messages for ``example.test``
       (default 10,000; ``--quick`` 1,000) are injected with Postfix's
       ``smtp-source`` (20 sessions, connections reused) while the primary is
       down, so every one of them is held.  Then the primary -- Postfix's
       ``smtp-sink`` on a loopback port, dumping each message to a file --
       starts, and the clock runs until the server's queue is empty.  The sink's
       files go to /dev/shm (``--sink-dumps DIR`` elsewhere): a primary has a
       disk of its own, and on the server's disk smtp-sink's file creation
       waited for the server's fsyncs (``openat`` 0.9 ms per message beside
       backupmx, 0.28 ms beside Postfix, by ``strace -c``; the sink's CPU per
       message was 0.5-0.7 ms beside backupmx, 0.26-0.29 ms beside Postfix, and
       0.14-0.22 ms beside either with its files in memory).
       msg/s = N / (queue empty - primary started).
       backupmx: static route to the sink, pacing raised
       (``initial_connections_per_host = max_connections_per_host = 20``,
       ``max_messages_per_second_per_host = 0``), ``probe_interval = "1s"``,
       and ``ETRN example.test`` (RFC 1985, as a primary back up sends it)
       right after the sink starts: what ``postqueue -f`` is to Postfix.  With
       ``--probe`` no ETRN: it notices the primary on its own, within the
       probe interval (up to a second more).  Postfix (``postfix_backup.py``,
       relaying to ``[127.0.0.1]:<sink port>``): ``postqueue -f`` right after
       the sink starts, and ``initial_destination_concurrency = 20`` so that
       both start at the same concurrency (the limit is 20 for both).
       Beside it, the CPU time per message during the flush (from /proc/stat
       and the sink's /proc/<pid>/stat): the sink's own, and the rest of the
       machine's (the server under test and the kernel), and how much stayed
       idle.  The sink writes every message to a file; on a 2-vCPU machine its
       share bounds what either server can reach.
    2. Recovery latency: primary started -> first message in the sink's dump
       directory (polled every 5 ms).
    3. Claim cost: `Store.claim` of a 100-recipient batch with 1,000 and with
       1,000,000 queued recipients (``--quick``: 100,000), in a fresh SQLite
       queue whose rows are inserted directly with SQLAlchemy executemany
       (100 recipients per message); median and worst of `CLAIM_REPEATS` claims.

How the queues are watched
    backupmx: its SQLite file is read directly every 0.1 s (count of
    recipients not yet delivered, bounced or expired): a ``backupmx queue
    stats --json`` per poll would cost a second of CPU each on the machine
    under test.  ``queue stats --json`` is run once before and once after the
    flush to confirm the counts.  Postfix: its queue files are counted
    (``PostfixBackupMX.held_count``; ``deferred`` alone before the flush).

Run (as root, Postfix needs it) from the repository root::

    .venv/bin/python bench/flush.py            # 10,000 messages, 1M-recipient claims
    .venv/bin/python bench/flush.py --quick    # 1,000 messages, 100k-recipient claims
    .venv/bin/python bench/flush.py --only backupmx --messages 5000
    .venv/bin/python bench/flush.py --only backupmx --probe   # no ETRN: the probe finds it

Every phase is bounded by ``--timeout`` seconds; servers, sinks and temporary
directories are removed on exit, also on error or Ctrl-C.  Only loopback
addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import smtplib
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from accept import (
    KIB,
    REPO_ROOT,
    BackupMXServer,
    LoadResult,
    free_port,
    run_smtp_source,
    sigterm_as_exit,
)
from postfix_backup import POSTQUEUE, PostfixBackupMX, ServerError

sys.path.insert(0, str(REPO_ROOT))
from tests.support.primary_sink import SmtpSink  # the tests' smtp-sink helper

MESSAGES: Final = 10_000
QUICK_MESSAGES: Final = 1_000
MESSAGE_SIZE: Final = 10 * KIB
SESSIONS: Final = 20
CONNECTIONS: Final = 20
CLAIM_SIZES: Final = (1_000, 1_000_000)
QUICK_CLAIM_SIZES: Final = (1_000, 100_000)
CLAIM_BATCH: Final = 100
CLAIM_REPEATS: Final = 20
RECIPIENTS_PER_MESSAGE: Final = 100
INSERT_CHUNK: Final = 50_000
SINK_HOSTNAME: Final = "primary.bench.test"
# Where the sink writes what it receives: in memory if the machine has /dev/shm.  A
# primary is another machine with a disk of its own; on the server's disk, smtp-sink's
# file creation waited for the server's fsyncs (its openat took 0.9 ms per message
# beside backupmx's flush, 0.28 ms beside Postfix's, by strace -c).
SINK_DUMPS: Final = "/dev/shm" if os.path.isdir("/dev/shm") else None

BACKUPMX_CONF: Final = """\
hostname = "mx2.bench.test"
listen = ["127.0.0.1:{port}"]
database = "sqlite:///{db}"
etrn_clients = ["127.0.0.1"]

[limits]
max_connections = 200
max_connections_per_ip = 200

[metrics]
listen = ""  # off: its default port 9325 is fixed, and runs may overlap

[delivery]
probe_interval = "1s"
retry_min = "1s"
retry_max = "5s"
initial_connections_per_host = {connections}
max_connections_per_host = {connections}
max_messages_per_second_per_host = 0

[[domain]]
name = "example.test"
primary = ["127.0.0.1:{sink_port}"]
"""

PENDING_SQL: Final = (
    "SELECT count(*) FROM recipients WHERE state NOT IN ('delivered', 'bounced', 'expired')"
)


# --------------------------------------------------------------------------- servers


class BackupMXFlush(BackupMXServer):
    """backupmx routing example.test to the sink's port, pacing raised."""

    def __init__(self, workdir: Path, port: int, sink_port: int, opts: argparse.Namespace) -> None:
        super().__init__(workdir, port, python=opts.python, timeout=opts.timeout)
        self.sink_port = sink_port
        self.db = workdir / "queue.db"
        self.etrn = not opts.probe

    def write_config(self) -> None:
        self.conf.write_text(
            BACKUPMX_CONF.format(
                port=self.port, db=self.db, connections=CONNECTIONS, sink_port=self.sink_port
            )
        )

    def _scalar(self, sql: str) -> object:
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10) as db:
            return db.execute(sql).fetchone()[0]

    def pending(self) -> int:
        return int(str(self._scalar(PENDING_SQL)))

    def primary_down(self) -> bool:
        return self._scalar("SELECT count(*) FROM domains WHERE state = 'down'") == 1

    def held(self) -> bool:
        """Every message queued and the primary known to be down."""
        return self.primary_down()

    def queue_stats(self) -> dict[str, object]:
        result = subprocess.run(
            [self.python, "-m", "backupmx", "--config", str(self.conf), "queue", "stats", "--json"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=self.timeout,
            check=True,
        )
        stats: dict[str, object] = json.loads(result.stdout)
        return stats

    def flush(self) -> None:
        """ETRN for the domain; with --probe nothing: the next probe (within a second)
        finds the primary back."""
        if not self.etrn:
            return
        with smtplib.SMTP("127.0.0.1", self.port, timeout=self.timeout) as smtp:
            smtp.ehlo("primary.bench.test")
            code, text = smtp.docmd("ETRN", "example.test")
            if code != 250:
                raise ServerError(f"ETRN: {code} {text.decode(errors='replace')}")


class PostfixHolding(PostfixBackupMX):
    """The private Postfix as a server that holds mail until `flush` (postqueue -f)."""

    def pending(self) -> int:
        return self.held_count()

    def held(self) -> bool:
        """Every message tried once and deferred."""
        return _files(self.queue_dir / "deferred") == self.held_count()

    def flush(self) -> None:
        subprocess.run(
            [POSTQUEUE, "-c", str(self.config_dir), "-f"],
            capture_output=True,
            timeout=self.timeout,
            check=True,
        )


class PostfixFlush(PostfixHolding):
    """The private Postfix relaying to the sink, starting at the same concurrency."""

    def write_config(self) -> None:
        super().write_config()
        with (self.config_dir / "main.cf").open("a") as main_cf:
            main_cf.write(
                f"initial_destination_concurrency = {CONNECTIONS}\n"
                f"default_destination_concurrency_limit = {CONNECTIONS}\n"
            )


def _files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


# --------------------------------------------------------------------------- flush


@dataclass(frozen=True)
class Flush:
    server: str
    messages: int
    inject_seconds: float
    recovery_seconds: float  # primary started -> first message at the primary
    flush_seconds: float  # primary started -> queue empty
    delivered: int  # dump files at the sink (duplicates included)
    cpu: CpuShare  # where the machine's CPU went during the flush

    @property
    def rate(self) -> float:
        return self.messages / self.flush_seconds if self.flush_seconds > 0 else 0.0


@dataclass(frozen=True)
class CpuShare:
    """CPU time during a flush, per message, from /proc: the sink's own, and the rest
    of the machine's (the server under test, the kernel, anything else)."""

    sink_ms: float
    rest_ms: float
    idle: float  # fraction of the machine's CPU time left idle

    @classmethod
    def between(cls, before: CpuSample, after: CpuSample, messages: int) -> CpuShare:
        ticks = os.sysconf("SC_CLK_TCK")
        busy = (after.busy - before.busy) / ticks
        sink = (after.sink - before.sink) / ticks
        total = busy + (after.idle - before.idle) / ticks
        per = 1000.0 / max(messages, 1)
        return cls(sink * per, (busy - sink) * per, 1 - busy / total if total else 0.0)


@dataclass(frozen=True)
class CpuSample:
    busy: int  # clock ticks of every CPU, not idle
    idle: int
    sink: int  # the sink process's user and system ticks

    @classmethod
    def now(cls, sink_pid: int) -> CpuSample:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:8]]  # up to softirq
        idle = fields[3] + fields[4]  # idle, iowait (steal is not ours: not counted)
        with open(f"/proc/{sink_pid}/stat") as stat:
            own = stat.read().rsplit(")", 1)[1].split()  # after the command's name
        return cls(sum(fields) - idle, idle, int(own[11]) + int(own[12]))


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise ServerError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def first_dump(sink: SmtpSink) -> bool:
    with os.scandir(sink.dump_dir) as entries:
        return any(True for _ in entries)


def flush_run(name: str, messages: int, opts: argparse.Namespace) -> Flush:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-flush-{name}-"))
    port, sink_port = free_port(), free_port()
    server: BackupMXFlush | PostfixFlush
    if name == "backupmx":
        server = BackupMXFlush(workdir, port, sink_port, opts)
    else:
        server = PostfixFlush(workdir, port, primary=f"[127.0.0.1]:{sink_port}")
    sink = SmtpSink("127.0.0.1", sink_port, name=SINK_HOSTNAME, dump_root=opts.sink_dumps)
    try:
        progress(f"{name}: injecting {messages} messages while the primary is down")
        server.start()
        load: LoadResult = run_smtp_source(
            port,
            sessions=SESSIONS,
            messages=messages,
            size=MESSAGE_SIZE,
            timeout=opts.timeout,
            reuse=True,
        )
        if load.returncode != 0:
            raise ServerError(f"smtp-source failed: {load.stderr[-300:]}")
        wait_until(lambda: server.pending() == messages, opts.timeout, "all held", 0.2)
        wait_until(server.held, opts.timeout, "the primary known down", 0.2)
        if isinstance(server, BackupMXFlush):
            stats = server.queue_stats()
            if stats["messages"] != messages:
                raise ServerError(f"queue stats before the flush: {stats}")

        progress(f"{name}: primary back, flushing")
        sink.start()
        assert sink.process is not None
        started = time.monotonic()
        before = CpuSample.now(sink.process.pid)
        server.flush()
        wait_until(lambda: first_dump(sink), opts.timeout, "the first delivery", 0.005)
        recovery = time.monotonic() - started
        wait_until(lambda: server.pending() == 0, opts.timeout, "an empty queue", 0.1)
        flushed = time.monotonic() - started
        cpu = CpuShare.between(before, CpuSample.now(sink.process.pid), messages)
        if isinstance(server, BackupMXFlush):
            stats = server.queue_stats()
            if stats["messages"] != 0:
                raise ServerError(f"queue stats after the flush: {stats}")
        return Flush(name, messages, load.elapsed, recovery, flushed, sink.count(), cpu)
    finally:
        server.stop()
        sink.close()
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- claim cost


@dataclass(frozen=True)
class ClaimCost:
    queued: int
    insert_seconds: float
    median_ms: float
    worst_ms: float


async def claim_cost(queued: int) -> ClaimCost:
    from sqlalchemy import insert

    from backupmx.queue.database import open_writer_engine, upgrade
    from backupmx.queue.models import domains, messages, recipients
    from backupmx.queue.store import Store

    directory = Path(tempfile.mkdtemp(prefix="bench-claim-"))
    url = f"sqlite:///{directory / 'queue.db'}"
    store = Store.open(url)
    try:
        await upgrade(store.engine)
        engine = open_writer_engine(url)
        base = datetime.now(UTC) - timedelta(days=1)
        started = time.monotonic()
        count = max(queued // RECIPIENTS_PER_MESSAGE, 1)
        with engine.begin() as conn:
            conn.execute(
                insert(messages),
                [
                    {
                        "id": f"{m:020X}", "sender": "s@bench.test", "size": 3,
                        "sha256": "0" * 64, "received_at": base, "client_ip": "127.0.0.1",
                        "client_helo": "bench", "protocol": "ESMTP", "tls": None,
                        "body_type": "7BIT", "smtputf8": False, "dsn_ret": None,
                        "dsn_envid": None, "session_id": "bench",
                    }
                    for m in range(count)
                ],
            )  # fmt: skip
            # The claim finds due mail through its domain's row (the intake writes it).
            conn.execute(
                insert(domains),
                {"name": "example.test", "state": "unknown", "since": base, "updated_at": base},
            )
        for first in range(0, queued, INSERT_CHUNK):
            with engine.begin() as conn:
                conn.execute(
                    insert(recipients),
                    [
                        {
                            "message_id": f"{r // RECIPIENTS_PER_MESSAGE:020X}",
                            "address": f"r{r}@example.test", "domain": "example.test",
                            "state": "queued", "attempts": 0,
                            "next_attempt_at": base + timedelta(microseconds=r),
                            "last_error": None, "lease_owner": None, "lease_until": None,
                            "dsn_notify": None, "dsn_orcpt": None, "updated_at": base,
                            "delay_warned": False,
                        }
                        for r in range(first, min(first + INSERT_CHUNK, queued))
                    ],
                )  # fmt: skip
        engine.dispose()
        inserted = time.monotonic() - started
        await store.claim("bench", CLAIM_BATCH)  # warm-up
        await store.give_back_leases("bench")
        times = []
        for _ in range(CLAIM_REPEATS):
            before = time.perf_counter()
            claims = await store.claim("bench", CLAIM_BATCH)
            times.append((time.perf_counter() - before) * 1000)
            if len(claims) != CLAIM_BATCH:
                raise ServerError(f"claimed {len(claims)} of {CLAIM_BATCH}")
            await store.give_back_leases("bench")  # the same queue for the next claim
        return ClaimCost(queued, inserted, statistics.median(times), max(times))
    finally:
        await store.close()
        shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------- report


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def report(flushes: Sequence[Flush], claims: Sequence[ClaimCost], opts: argparse.Namespace) -> str:
    lines = []
    if flushes:
        lines += [
            f"flush of {flushes[0].messages} held {MESSAGE_SIZE // KIB} KiB messages "
            f"({CONNECTIONS} connections, no rate cap)",
            f"{'server':<10}{'msg/s':>9}{'flush s':>10}{'recovery s':>12}"
            f"{'inject s':>10}{'at sink':>9}{'sink CPU':>10}{'rest CPU':>10}{'idle':>6}",
        ]
        for f in flushes:
            lines.append(
                f"{f.server:<10}{f.rate:>9.0f}{f.flush_seconds:>10.1f}"
                f"{f.recovery_seconds:>12.3f}{f.inject_seconds:>10.1f}{f.delivered:>9}"
                f"{f.cpu.sink_ms:>7.3f} ms{f.cpu.rest_ms:>7.3f} ms{f.cpu.idle:>6.0%}"
            )
        lines.append(
            "CPU per message during the flush, from /proc: the sink's own (it writes each "
            f"message to a file under {opts.sink_dumps or tempfile.gettempdir()}), and the rest "
            "of the machine's (server, kernel, other work)"
        )
        rates = {f.server: f.rate for f in flushes}
        if rates.get("postfix") and "backupmx" in rates:
            lines.append(f"ratio backupmx/postfix: {rates['backupmx'] / rates['postfix']:.2f}")
        lines.append(
            "recovery: backupmx by its own probe (1 s); postfix after `postqueue -f`"
            if opts.probe
            else "recovery: backupmx after `ETRN example.test`; postfix after `postqueue -f`"
        )
    if claims:
        lines.append(f"Store.claim of {CLAIM_BATCH} recipients (SQLite, {CLAIM_REPEATS} claims)")
        for c in claims:
            lines.append(
                f"  {c.queued:>9,} queued: median {c.median_ms:.2f} ms, worst {c.worst_ms:.2f} ms"
                f"  (rows inserted in {c.insert_seconds:.1f} s)"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 messages; 100k claims")
    parser.add_argument("--messages", type=int, help="held messages (default 10,000)")
    parser.add_argument(
        "--only", choices=("backupmx", "postfix", "claim"), action="append", help="repeatable"
    )
    parser.add_argument(
        "--probe", action="store_true", help="no ETRN: backupmx's probe finds the primary"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="limit per phase, seconds")
    parser.add_argument("--python", default=sys.executable, help="interpreter for backupmx")
    parser.add_argument(
        "--sink-dumps",
        default=SINK_DUMPS,
        metavar="DIR",
        help=f"where the primary (smtp-sink) writes each message (default {SINK_DUMPS}; "
        "a directory on the server's disk makes its file creation wait for the server's fsyncs)",
    )
    opts = parser.parse_args(argv)
    opts.messages = opts.messages or (QUICK_MESSAGES if opts.quick else MESSAGES)
    opts.claim_sizes = QUICK_CLAIM_SIZES if opts.quick else CLAIM_SIZES
    opts.only = opts.only or ["backupmx", "postfix", "claim"]
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if shutil.which("smtp-source") is None or shutil.which("smtp-sink") is None:
        raise SystemExit("smtp-source and smtp-sink are needed (Debian package: postfix)")
    load_before = os.getloadavg()[0]
    if load_before > 0.5 * len(os.sched_getaffinity(0)):
        progress(f"warning: load average is {load_before:.2f}; the figures will be noisy")
    flushes: list[Flush] = []
    claims: list[ClaimCost] = []
    with sigterm_as_exit():
        try:
            for name in ("backupmx", "postfix"):
                if name in opts.only:
                    flushes.append(flush_run(name, opts.messages, opts))
            if "claim" in opts.only:
                for size in opts.claim_sizes:
                    progress(f"claim: {size:,} queued recipients")
                    claims.append(asyncio.run(asyncio.wait_for(claim_cost(size), opts.timeout)))
        except ServerError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    print(report(flushes, claims, opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
