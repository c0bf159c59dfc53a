"""A steady flow through the queue: backupmx relaying to a primary that is up, for a long time.

What is measured
    Whether the cost of the queue follows what is pending, not what has passed
    through it: ``backupmx serve`` relays 10 KiB messages for ``example.test``
    to a fast primary that is up the whole time, for ``--minutes`` (default 5)
    or until ``--messages`` have been accepted, while the queue database's size
    on disk and the server's memory are watched.  With a queue that forgets
    finished mail (or keeps only a bounded record of it), both stay flat; with
    one that keeps every body, the database grows by the message size per
    message and everything that scans it slows down.

How
    The primary is Postfix's ``smtp-sink`` on a loopback port, without ``-d``:
    it discards what it receives and only counts it (``-c``).  backupmx routes
    ``example.test`` to it statically, with pacing raised as in
    ``bench/flush.py`` (20 connections from the start, no rate cap,
    ``probe_interval = retry_min = "1s"``) so that the primary is not the
    bottleneck; ``--keep-finished DURATION`` writes ``[queue] keep_finished``
    into the config (only then, so that the script runs on code that does not
    know the key).  Postfix's ``smtp-source`` sends the load: back-to-back runs
    of ``--batch`` messages (default 10,000) over ``--sessions`` sessions
    (default 20, connections reused) until the time or the message budget is
    used up.  Then the queue is left to drain (bounded by ``--timeout``).

    Every ``--every`` seconds (default 30) one line: elapsed time; accepted
    (``backupmx_messages_accepted_total`` from the metrics endpoint); delivered
    (``backupmx_recipients_total{result="delivered"}``) and what the sink
    counted; pending recipients (``backupmx_queue_recipients``); the database
    size (SQLite: the .db file + its -wal; PostgreSQL: pg_database_size); the
    RSS of serve and its descendants (VmRSS from /proc/PID/status, summed);
    the CPU they used since the previous line, in % of one core; and how many
    messages of the interval waited over a second for their 250 (from the
    ``backupmx_accept_latency_seconds`` histogram: deleting finished records
    and giving pages back must never stall receiving).  At the end:
    totals, throughput, database size first and last, and the median RSS of
    the first quarter of the samples taken under load against the last
    quarter's, with the growth in %.

    "accepted" counts the server's 250 answers.  smtp-source is stopped at the
    deadline, so up to one message per session may be committed (and then
    delivered) without its 250 having been sent: the summary says so when the
    sink got more than were accepted.

Run from the repository root::

    .venv/bin/python bench/soak.py                                  # 5 minutes
    .venv/bin/python bench/soak.py --minutes 1 --every 10           # a quick look
    .venv/bin/python bench/soak.py --messages 1000000 --minutes 60  # the long run
    .venv/bin/python bench/soak.py --keep-finished 1h
    .venv/bin/python bench/soak.py --postgres postgresql://postgres@127.0.0.1:5432/postgres

Progress lines go to stderr as they are taken and the summary to stdout
(``--json FILE`` also saves every sample).  Every wait is bounded; the server,
the sink, smtp-source, the temporary directory and the PostgreSQL database are
removed on exit, also on error or Ctrl-C.  Only loopback addresses are used.
The database grows by about 10 KiB per message if finished bodies are kept:
a million messages need some 12 GB free under ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from accept import (
    DOMAIN,
    KIB,
    MIB,
    _last_count,
    filesystem_of,
    free_port,
    sigterm_as_exit,
    smtp_source_command,
)
from idle import (
    BenchDatabase,
    ConfiguredServer,
    cleanup,
    cpu_model,
    cpu_spent,
    progress,
    tree_cpu,
    tree_rss_kib,
    workspace,
)
from postfix_backup import ServerError, wait_for_port
from prometheus_client.parser import text_string_to_metric_families

SMTP_SINK: Final = "smtp-sink"
SINK_HOSTNAME: Final = "primary.bench.test"
SINK_BACKLOG: Final = 256
POSTGRES_DATABASE: Final = "backupmx_soak_bench"
MAX_RUNS: Final = 100_000  # smtp-source runs, whatever the budget
MAX_EMPTY_RUNS: Final = 3  # runs in a row that got nothing accepted: the server is broken
STOP_SECONDS: Final = 10.0
SLOW_ACCEPT: Final = 1.0  # seconds; a bucket of backupmx_accept_latency_seconds

DELIVERY: Final = {
    "probe_interval": "1s",
    "retry_min": "1s",
    "retry_max": "5s",
    "initial_connections_per_host": 20,
    "max_connections_per_host": 20,
    "max_messages_per_second_per_host": 0,
}


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = STOP_SECONDS) -> None:
    """SIGTERM, then SIGKILL; bounded."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


# --------------------------------------------------------------------------- the primary


class DiscardingSink:
    """``smtp-sink`` that keeps nothing: no ``-d``; ``-c`` prints its counters
    ("sess=N quit=N mesg=N") to a file, read back by `count`."""

    def __init__(self, directory: Path, port: int, timeout: float) -> None:
        self.port = port
        self.timeout = timeout
        self.output = directory / "smtp-sink.out"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        with self.output.open("wb") as out:
            self._proc = subprocess.Popen(
                [
                    SMTP_SINK,
                    *user,
                    "-c",
                    "-h",
                    SINK_HOSTNAME,
                    f"127.0.0.1:{self.port}",
                    str(SINK_BACKLOG),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc = self._proc
        wait_for_port("127.0.0.1", self.port, self.timeout, alive=lambda: proc.poll() is None)

    def count(self) -> int | None:
        """Messages the sink received (its last ``mesg=`` counter)."""
        try:
            with self.output.open("rb") as out:
                out.seek(max(out.seek(0, os.SEEK_END) - 512, 0))
                tail = out.read().decode(errors="replace")
        except OSError:
            return None
        found = re.findall(r"mesg=(\d+)", tail)
        return int(found[-1]) if found else 0

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc)


# --------------------------------------------------------------------------- the load


class Load(threading.Thread):
    """Back-to-back smtp-source runs until `deadline` or `budget` messages counted."""

    def __init__(self, directory: Path, port: int, opts: argparse.Namespace, deadline: float):
        super().__init__(name="smtp-source", daemon=True)
        self.directory = directory
        self.port = port
        self.opts = opts
        self.deadline = deadline
        self.budget: int = opts.messages or 0  # 0: time only
        self.counted = 0  # DATA completions of finished runs (smtp-source -c)
        self.runs = 0
        self.failures: list[str] = []
        self.started = time.monotonic()
        self.finished: float | None = None
        self._current: Path | None = None
        self._halt = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None

    def sent(self) -> int:
        """Counted so far, the run in progress included."""
        current = self._current
        return self.counted + (_count_file(current) if current else 0)

    def run(self) -> None:
        try:
            self._runs()
        except Exception as error:  # reported by the main thread
            self.failures.append(f"{type(error).__name__}: {error}")
        finally:
            self.finished = time.monotonic()

    def _runs(self) -> None:
        empty = 0
        for index in range(MAX_RUNS):
            left = self.budget - self.counted if self.budget else self.opts.batch
            if self._halt.is_set() or left <= 0 or time.monotonic() >= self.deadline:
                return
            out = self.directory / f"smtp-source.{index % 2}.out"
            self._current = out
            with out.open("wb") as stdout:
                self._proc = subprocess.Popen(
                    smtp_source_command(
                        self.port,
                        sessions=self.opts.sessions,
                        messages=min(self.opts.batch, left),
                        size=self.opts.size * KIB,
                        reuse=self.opts.reuse_connections,
                    ),
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=subprocess.STDOUT,
                )
            code = self._wait(self._proc)
            got = _count_file(out)
            self.counted += got
            self._current = None
            self.runs += 1
            if code != 0 and not self._halt.is_set() and time.monotonic() < self.deadline:
                tail = out.read_text(errors="replace").strip().splitlines()[-1:]
                self.failures.append(f"smtp-source run {index} exit {code}: {tail}")
            empty = 0 if got else empty + 1
            if empty >= MAX_EMPTY_RUNS:
                self.failures.append(f"{empty} smtp-source runs in a row got nothing accepted")
                return

    def _wait(self, proc: subprocess.Popen[bytes]) -> int:
        """Wait for the run; cut it at the deadline or on stop (bounded by the deadline)."""
        while proc.poll() is None:
            if self._halt.is_set() or time.monotonic() >= self.deadline:
                stop_process(proc)
                break
            with suppress(subprocess.TimeoutExpired):
                proc.wait(min(0.5, max(self.deadline - time.monotonic(), 0.01)))
        return proc.returncode

    def stop(self) -> None:
        self._halt.set()
        stop_process(self._proc)
        self.join(STOP_SECONDS * 2)


def _count_file(path: Path) -> int:
    try:
        with path.open("rb") as out:
            out.seek(max(out.seek(0, os.SEEK_END) - 64, 0))
            return _last_count(out.read().decode(errors="replace"))
    except OSError:
        return 0


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Sample:
    elapsed: float
    phase: str  # "load" or "drain"
    sent: int  # smtp-source's count
    accepted: int | None  # the server's metrics
    delivered: int | None
    at_sink: int | None
    pending: int | None  # pending recipients (queued, sending, held)
    db_bytes: int
    rss_kib: int
    cpu_percent: float  # serve + descendants since the previous sample, % of one core
    slow: int | None  # accepts over SLOW_ACCEPT seconds since the previous sample


@dataclass(frozen=True)
class Metrics:
    accepted: int | None
    delivered: int | None
    pending: int | None
    slow: int | None = None  # accepts over SLOW_ACCEPT seconds since the server started


def read_metrics(server: ConfiguredServer) -> Metrics:
    """The counters the summary needs; None for what the endpoint does not give."""
    try:
        body = server.scrape()
    except OSError as error:
        progress(f"  metrics unreadable: {error}")
        return Metrics(None, None, None)
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            key = sample.name
            if key == "backupmx_recipients_total":
                key += ":" + sample.labels.get("result", "")
            if key == "backupmx_accept_latency_seconds_bucket":
                key += ":" + sample.labels.get("le", "")
            sums[key] = sums.get(key, 0.0) + sample.value

    def value(key: str) -> int | None:
        return int(sums[key]) if key in sums else None

    pending = value("backupmx_queue_recipients")
    if pending is None and "backupmx_store_up" in sums:
        pending = 0  # the gauge has no series when nothing is pending
    answered = value("backupmx_accept_latency_seconds_count")
    quick = value(f"backupmx_accept_latency_seconds_bucket:{SLOW_ACCEPT:.1f}")
    return Metrics(
        value("backupmx_messages_accepted_total"),
        value("backupmx_recipients_total:delivered") or 0,
        pending,
        None if answered is None or quick is None else answered - quick,
    )


class Sampler:
    def __init__(
        self, server: ConfiguredServer, sink: DiscardingSink, db: BenchDatabase, load: Load
    ) -> None:
        self.server = server
        self.sink = sink
        self.db = db
        self.load = load
        self.samples: list[Sample] = []
        self._cpu = tree_cpu(server.pid)
        self._at = time.monotonic()
        self._slow = 0

    def age(self) -> float:
        """Seconds since the last sample."""
        return time.monotonic() - self._at

    def take(self, phase: str) -> Sample:
        cpu, now = tree_cpu(self.server.pid), time.monotonic()
        spent = cpu_spent(self._cpu, cpu)
        percent = 100.0 * spent / (now - self._at) if now > self._at else 0.0
        self._cpu, self._at = cpu, now
        metrics = read_metrics(self.server)
        slow = None if metrics.slow is None else metrics.slow - self._slow
        self._slow = metrics.slow if metrics.slow is not None else self._slow
        sample = Sample(
            elapsed=now - self.load.started,
            phase=phase,
            sent=self.load.sent(),
            accepted=metrics.accepted,
            delivered=metrics.delivered,
            at_sink=self.sink.count(),
            pending=metrics.pending,
            db_bytes=self.db.size_bytes(),
            rss_kib=tree_rss_kib(self.server.pid),
            cpu_percent=percent,
            slow=slow,
        )
        self.samples.append(sample)
        progress(line(sample))
        return sample


def _n(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


HEADER: Final = (
    f"{'elapsed':>8} {'phase':<5} {'accepted':>10} {'delivered':>10} {'at sink':>10} "
    f"{'pending':>8} {'db MiB':>9} {'RSS MiB':>8} {'CPU %':>6} {'>1s':>5}"
)


def line(s: Sample) -> str:
    return (
        f"{s.elapsed:>7.0f}s {s.phase:<5} {_n(s.accepted):>10} {_n(s.delivered):>10} "
        f"{_n(s.at_sink):>10} {_n(s.pending):>8} {s.db_bytes / MIB:>9.1f} "
        f"{s.rss_kib / KIB:>8.1f} {s.cpu_percent:>6.0f} {_n(s.slow):>5}"
    )


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Soak:
    backend: str
    samples: list[Sample]
    load_seconds: float
    drained_at: float | None  # elapsed when nothing was pending and all was delivered
    sent: int
    runs: int
    failures: list[str]

    @property
    def last(self) -> Sample:
        return self.samples[-1]

    def rss_quarters(self) -> tuple[float, float] | None:
        under_load = [s.rss_kib for s in self.samples if s.phase == "load"]
        if not under_load:
            return None
        quarter = max(len(under_load) // 4, 1)
        return statistics.median(under_load[:quarter]), statistics.median(under_load[-quarter:])


def soak_run(opts: argparse.Namespace) -> Soak:
    with workspace("bench-soak-", opts.workdir) as directory:
        db = BenchDatabase(directory, opts.postgres, POSTGRES_DATABASE)
        sink = DiscardingSink(directory, free_port(), opts.timeout)
        server: ConfiguredServer | None = None
        load: Load | None = None
        try:
            settings: dict[str, Any] = {
                "database": db.url,
                "limits": {"max_connections": 200, "max_connections_per_ip": 200},
                "delivery": dict(DELIVERY),
                "domain": [{"name": DOMAIN, "primary": [f"127.0.0.1:{sink.port}"]}],
            }
            if opts.keep_finished:
                settings["queue"] = {"keep_finished": opts.keep_finished}
            server = ConfiguredServer(directory, settings, python=opts.python, timeout=opts.timeout)
            sink.start()
            server.start()
            progress(
                f"soak: {db.backend}, {opts.size} KiB messages, {opts.sessions} sessions, "
                f"for {opts.minutes:g} min"
                + (f" or {opts.messages:,} messages" if opts.messages else "")
                + f"; a line every {opts.every:g} s"
            )
            progress(HEADER)
            load = Load(directory, server.port, opts, time.monotonic() + opts.minutes * 60)
            sampler = Sampler(server, sink, db, load)
            load.start()
            next_sample = load.started + opts.every
            while load.is_alive():  # bounded by --minutes (the load's deadline)
                if not server.running():
                    raise ServerError(f"backupmx serve exited:\n{server.log_tail()}")
                load.join(max(min(next_sample - time.monotonic(), 1.0), 0.0))
                if time.monotonic() >= next_sample and load.is_alive():
                    sampler.take("load")
                    next_sample += opts.every
            load_seconds = (load.finished or time.monotonic()) - load.started
            if sampler.age() > min(1.0, opts.every / 2):  # not twice at the same moment
                sampler.take("load")

            drained_at = None
            drain_deadline = time.monotonic() + opts.timeout
            next_sample = time.monotonic() + opts.every
            while time.monotonic() < drain_deadline:  # bounded by --timeout
                metrics = read_metrics(server)
                if (
                    metrics.pending == 0
                    and metrics.accepted is not None
                    and (metrics.delivered or 0) >= metrics.accepted
                ):
                    drained_at = time.monotonic() - load.started
                    break
                if time.monotonic() >= next_sample:
                    sampler.take("drain")
                    next_sample += opts.every
                time.sleep(0.5)
            else:
                progress(f"  ! the queue did not drain within {opts.timeout:g} s")
            sampler.take("end")
            return Soak(
                db.backend,
                sampler.samples,
                load_seconds,
                drained_at,
                load.counted,
                load.runs,
                load.failures,
            )
        except Exception:
            if server is not None:
                progress(server.log_tail(30))
            raise
        finally:
            cleanup(
                load.stop if load is not None else None,
                server.stop if server is not None else None,
                sink.stop,
                db.close,
            )


# --------------------------------------------------------------------------- report


def report(result: Soak, opts: argparse.Namespace, load_before: float) -> str:
    end = result.last
    first = result.samples[0]
    accepted = end.accepted or 0
    delivered = end.delivered or 0
    lines = [
        "",
        f"A steady flow through the queue: {opts.size} KiB messages, backupmx -> smtp-sink "
        f"({result.backend}; {opts.sessions} smtp-source sessions, connections "
        + ("reused" if opts.reuse_connections else "one per message")
        + ")",
        "",
        f"cpu:           {cpu_model()}",
        f"kernel:        {platform.system()} {platform.release()}",
        f"python:        {platform.python_version()} ({opts.python} runs backupmx)",
        f"queue fs:      {filesystem_of(opts.workdir or tempfile.gettempdir())}"
        if not opts.postgres
        else f"queue:         PostgreSQL, database {POSTGRES_DATABASE}",
        f"keep_finished: {opts.keep_finished or '(not set: the server default)'}",
        f"load avg:      {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (1 min)",
        "",
        HEADER,
        *(line(s) for s in result.samples),
        "",
        f"load:          {result.load_seconds:.0f} s, {result.runs} smtp-source runs, "
        f"{result.sent:,} messages counted by smtp-source",
        f"totals:        accepted {_n(end.accepted)}, delivered {_n(end.delivered)}, "
        f"at the sink {_n(end.at_sink)}, pending at the end {_n(end.pending)}",
        f"throughput:    accepted {accepted / result.load_seconds:.0f} msg/s under load"
        + (
            f", delivered {delivered / result.drained_at:.0f} msg/s until the queue was empty "
            f"({result.drained_at:.0f} s)"
            if result.drained_at
            else ", the queue never drained"
        ),
        f"db size:       first sample {first.db_bytes / MIB:.1f} MiB, last {end.db_bytes / MIB:.1f}"
        f" MiB ({end.db_bytes / max(accepted, 1) / KIB:.2f} KiB per accepted message)",
    ]
    slow = [s.slow for s in result.samples if s.slow is not None]
    if slow:
        lines.append(
            f"slow accepts:  {sum(slow):,} of {accepted:,} waited over {SLOW_ACCEPT:g} s for "
            f"their 250 (most in one interval: {max(slow):,})"
        )
    quarters = result.rss_quarters()
    if quarters:
        early, late = quarters
        lines.append(
            f"RSS:           median {early / KIB:.1f} MiB in the first quarter of the samples "
            f"under load, {late / KIB:.1f} MiB in the last: "
            f"{100.0 * (late - early) / early:+.1f} %"
        )
    for failure in result.failures:
        lines.append(f"! {failure}")
    if end.accepted is not None and end.at_sink is not None and end.at_sink < accepted:
        lines.append(f"! the sink got {end.at_sink:,} of {accepted:,} accepted messages")
    elif end.accepted is not None and end.at_sink is not None and end.at_sink > accepted:
        lines.append(
            f"note: the sink got {end.at_sink - accepted:,} more than were answered 250: "
            "messages committed while smtp-source was cut at the deadline (at most one per "
            "session) are delivered, but their session never answered"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--minutes", type=float, default=5.0, help="load for this long (default %(default)g)"
    )
    parser.add_argument(
        "--messages", type=int, help="or until smtp-source counted this many accepted"
    )
    parser.add_argument(
        "--every", type=float, default=30.0, help="seconds between lines (default %(default)g)"
    )
    parser.add_argument(
        "--keep-finished",
        metavar="DURATION",
        help='write [queue] keep_finished = "DURATION" into the config (default: not written)',
    )
    parser.add_argument(
        "--size", type=int, default=10, metavar="KIB", help="message size (default %(default)d)"
    )
    parser.add_argument(
        "--sessions", type=int, default=20, help="smtp-source sessions (default %(default)d)"
    )
    parser.add_argument(
        "--batch", type=int, default=10_000, help="messages per smtp-source run (default 10,000)"
    )
    parser.add_argument(
        "--reuse-connections",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="all of a session's messages on one connection (smtp-source -d; default on)",
    )
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help=f"a PostgreSQL server to create the database {POSTGRES_DATABASE} on, e.g. "
        "postgresql://postgres@127.0.0.1:5432/postgres (default: SQLite)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="limit for start-up and for the drain after the load, seconds (default %(default)g)",
    )
    parser.add_argument(
        "--workdir", help="where the temporary directory goes (default: system temp dir)"
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for backupmx")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the samples as JSON")
    opts = parser.parse_args(argv)
    if opts.minutes <= 0 or opts.every <= 0 or opts.timeout <= 0:
        parser.error("--minutes, --every and --timeout must be positive")
    for name in ("messages", "size", "sessions", "batch"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1")
    if opts.postgres and not opts.postgres.startswith("postgresql"):
        parser.error("--postgres takes a postgresql:// URL")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    for tool in ("smtp-source", SMTP_SINK):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (Debian package: postfix)")
    load_before = os.getloadavg()[0]
    if load_before > 0.5 * len(os.sched_getaffinity(0)):
        progress(f"warning: load average is {load_before:.2f}; the figures will be noisy")
    with sigterm_as_exit():
        try:
            result = soak_run(opts)
        except (ServerError, subprocess.TimeoutExpired, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted; the server and its files are removed", file=sys.stderr)
            return 130
    print(report(result, opts, load_before))
    if opts.json is not None:
        opts.json.write_text(
            json.dumps(
                asdict(result) | {"cpu": cpu_model(), "rss_quarters_kib": result.rss_quarters()},
                indent=2,
            )
        )
    return 1 if result.failures or result.drained_at is None else 0


if __name__ == "__main__":
    sys.exit(main())
