"""Durable accept throughput of backupmx versus Postfix, both as a backup MX.

What is measured
    How many messages per second each server accepts *durably* over SMTP
    while acting as the backup MX for ``example.test`` whose primary
    (``127.0.0.1:9``) refuses connections, so every accepted message must be
    held in the server's queue.  Three servers: Postfix, backupmx with its
    SQLite queue (``backupmx``) and backupmx with a PostgreSQL queue
    (``backupmx-pg``).  Matrix: message body 10 KiB and 100 KiB x 10 and 50
    parallel SMTP sessions (``--sessions 1,10,50`` adds the single session).
    The targets of issue 14 -- backupmx at least 3.0x Postfix at 10 KiB and
    2.0x at 100 KiB, from 10 sessions up -- are judged for the SQLite queue;
    the PostgreSQL figures are printed beside it with their own ratio.

    Memory: 50 parallel sessions each sending one message of 1, 10 and
    25 MiB to backupmx (SQLite), reporting for each size the peak RSS summed
    over the server's whole process tree and the peak of its largest single
    process, so its growth with the message size shows; the 10 MiB row is
    judged against the 768 MiB target.

How
    For every cell a *fresh* server is started in its own temporary directory
    on a free loopback port: a private Postfix instance (``postfix_backup.py``)
    or ``python -m backupmx --config CONF serve`` (``receivers`` unset, so one
    receiver worker per core, unless ``--receivers N``; the metrics endpoint
    off).  backupmx-pg gets a
    fresh database on the PostgreSQL server at 127.0.0.1:5432 (user postgres,
    trust authentication), created for the cell and dropped after it.
    Postfix's ``smtp-source`` generates the load (one message per connection
    unless ``--reuse-connections``); the wall-clock time around it is measured
    with ``time.monotonic()``.  The server is then stopped and the messages it
    actually holds are counted -- queue files for Postfix, ``backupmx queue
    stats --json`` for backupmx -- and msg/s = held messages / elapsed time.
    smtp-source's own count is only used to flag discrepancies.  Each cell runs
    ``--repeat`` times (default 3) with the servers interleaved run by run, and
    the median rate is reported.

    Peak RSS is VmHWM from /proc/PID/status of every process under ``serve``
    (serve, its intake, the receiver workers and each worker's intake), read
    just before the server is stopped.  Each VmHWM is that process's own peak;
    the peaks need not coincide, so their sum slightly over-estimates the
    largest simultaneous total.  The memory rows give the highest of the runs.

Run (as root, Postfix needs it) from the repository root::

    .venv/bin/python bench/accept.py                  # full matrix + memory test
    .venv/bin/python bench/accept.py --quick          # ~300 messages per cell
    .venv/bin/python bench/accept.py --only postfix   # reference figures only
    .venv/bin/python bench/accept.py --only backupmx,backupmx-pg --sizes 10 --sessions 50
    .venv/bin/python bench/accept.py --receivers 1 --no-memory   # one receiver worker
    .venv/bin/python bench/accept.py --memory-only --memory-sizes 10

Progress goes to stderr, the result table to stdout (``--json FILE`` also
saves the raw figures).  Only loopback addresses are used; every server,
temporary directory and database is removed on exit, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Final, LiteralString, Protocol

from postfix_backup import PostfixBackupMX, ServerError, postfix_version, wait_for_port

KIB: Final = 1024
MIB: Final = 1024 * KIB

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
SMTP_SOURCE: Final = "smtp-source"
DOMAIN: Final = "example.test"
PRIMARY_HOST: Final = "127.0.0.1"
PRIMARY_PORT: Final = 9
SENDER: Final = "sender@bench.test"
RECIPIENT: Final = f"rcpt@{DOMAIN}"
HELO: Final = "client.bench.test"
SERVER_HOSTNAME: Final = "mx2.bench.test"

DEFAULT_SIZES_KIB: Final = (10, 100)
DEFAULT_SESSIONS: Final = (10, 50)
DEFAULT_MESSAGES: Final = 3000
DEFAULT_MESSAGES_ONE_SESSION: Final = 1000
QUICK_MESSAGES: Final = 300
DEFAULT_REPEAT: Final = 3

#: The servers, in the order they run and appear in the table.
SERVERS: Final = ("postfix", "backupmx", "backupmx-pg")

#: Minimum backupmx/postfix ratio per body size, from RATIO_TARGET_MIN_SESSIONS up.
RATIO_TARGETS: Final[dict[int, float]] = {10 * KIB: 3.0, 100 * KIB: 2.0}
RATIO_TARGET_MIN_SESSIONS: Final = 10

MEMORY_SESSIONS: Final = 50
MEMORY_SIZES: Final = (1 * MIB, 10 * MIB, 25 * MIB)
MEMORY_SIZE: Final = 10 * MIB  # the size MEMORY_TARGET_MIB is for
MEMORY_TARGET_MIB: Final = 768

#: The PostgreSQL server backupmx-pg's databases are created on (trust authentication).
POSTGRES_SERVER: Final = "postgres@127.0.0.1:5432"
POSTGRES_ADMIN_URL: Final = f"postgresql://{POSTGRES_SERVER}/postgres"  # for psycopg

BACKUPMX_CONF: Final = """\
hostname = "{hostname}"
listen = ["127.0.0.1:{port}"]
database = "{database}"
control_socket = "{control_socket}"
{receivers}

[limits]
max_connections = 200
max_connections_per_ip = 200
max_message_size = "50MiB"

[metrics]
listen = ""  # off: its default port 9325 is fixed, and runs may overlap

[[domain]]
name = "{domain}"
primary = ["{primary_host}:{primary_port}"]
"""

#: Key of ``backupmx queue stats --json`` holding the number of held messages.
QUEUE_STATS_KEY: Final = "messages"


# --------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------


class Server(Protocol):
    """What the benchmark needs from a server under test."""

    @property
    def name(self) -> str: ...

    @property
    def port(self) -> int: ...

    def start(self) -> None:
        """Start and return once the SMTP port accepts connections."""

    def stop(self) -> None:
        """Stop; idempotent, also after a failed start."""

    def held_count(self) -> int:
        """Messages durably held in the queue (called after stop())."""

    def discard(self) -> None:
        """Remove what outlives the work directory (called last, also after errors)."""

    def peak_rss(self) -> PeakRSS | None:
        """Peak RSS of the running server, or None if not measured (called before stop())."""

    def log_tail(self, lines: int = 20) -> str:
        """Last lines of the server log, for error reports."""


ServerFactory = Callable[[Path, int], Server]


class PostfixServer(PostfixBackupMX):
    """Postfix as a benchmark :class:`Server` (its RSS is not measured)."""

    def peak_rss(self) -> PeakRSS | None:
        # Postfix is many short-lived processes; a per-process peak is meaningless.
        return None

    def discard(self) -> None:
        """Everything is in the work directory."""


def backupmx_held_count(python: str, conf: Path, timeout: float) -> int:
    """Number of messages backupmx holds, via ``queue stats --json``.

    This is the one place that knows the CLI contract; adapt it if the
    command or its JSON output changes.
    """
    cmd = [python, "-m", "backupmx", "--config", str(conf), "queue", "stats", "--json"]
    res = subprocess.run(
        cmd,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if res.returncode != 0:
        raise ServerError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr}")
    try:
        return int(json.loads(res.stdout)[QUEUE_STATS_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise ServerError(f"unexpected output of {' '.join(cmd)}: {res.stdout!r}") from exc


class BackupMXServer:
    """``python -m backupmx serve`` with a throw-away config and SQLite queue.

    ``receivers``: written into the config when given; None leaves the default
    (one receiver worker per core).
    """

    name = "backupmx"

    def __init__(
        self,
        workdir: Path,
        port: int,
        *,
        python: str,
        timeout: float,
        receivers: int | None = None,
    ) -> None:
        self.workdir = workdir
        self._port = port
        self.python = python
        self.timeout = timeout
        self.receivers = receivers
        self.conf = workdir / "backupmx.toml"
        self.log = workdir / "backupmx.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self._port

    def database_url(self) -> str:
        return f"sqlite:///{self.workdir / 'queue.db'}"

    def write_config(self) -> None:
        self.conf.write_text(
            BACKUPMX_CONF.format(
                hostname=SERVER_HOSTNAME,
                port=self.port,
                database=self.database_url(),
                control_socket=self.workdir / "control.sock",
                receivers="" if self.receivers is None else f"receivers = {self.receivers}\n",
                domain=DOMAIN,
                primary_host=PRIMARY_HOST,
                primary_port=PRIMARY_PORT,
            )
        )

    def start(self) -> None:
        self.write_config()
        with self.log.open("wb") as log:
            self._proc = subprocess.Popen(
                [self.python, "-m", "backupmx", "--config", str(self.conf), "serve"],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: killpg() reaches workers
            )
        proc = self._proc
        wait_for_port("127.0.0.1", self.port, self.timeout, alive=lambda: proc.poll() is None)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                print(
                    f"warning: backupmx ignored SIGTERM for {self.timeout:.0f} s, killing it; "
                    f"its log ends:\n{self.log_tail()}",
                    file=sys.stderr,
                )
        # Kill whatever is left of the process group (workers, or a hung server).
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=self.timeout)

    def held_count(self) -> int:
        return backupmx_held_count(self.python, self.conf, self.timeout)

    def discard(self) -> None:
        """The SQLite queue is in the work directory."""

    def peak_rss(self) -> PeakRSS | None:
        if self._proc is None or self._proc.poll() is not None:
            return None
        return PeakRSS.of(process_tree(self._proc.pid))

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class BackupMXPostgres(BackupMXServer):
    """backupmx with its queue in a fresh PostgreSQL database, dropped by discard()."""

    name = "backupmx-pg"

    def __init__(
        self,
        workdir: Path,
        port: int,
        *,
        python: str,
        timeout: float,
        receivers: int | None = None,
    ) -> None:
        super().__init__(workdir, port, python=python, timeout=timeout, receivers=receivers)
        self.database = f"bench_accept_{secrets.token_hex(4)}"

    def database_url(self) -> str:
        return f"postgresql+psycopg://{POSTGRES_SERVER}/{self.database}"

    def start(self) -> None:
        postgres_admin("CREATE DATABASE {}", self.database)
        super().start()

    def discard(self) -> None:
        postgres_admin("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database)


def postgres_admin(statement: LiteralString, database: str) -> None:
    """Run ``statement`` about ``database`` ({}) on the admin database, in autocommit
    mode as CREATE and DROP DATABASE need."""
    import psycopg  # only backupmx-pg needs it
    from psycopg import sql

    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL(statement).format(sql.Identifier(database)))


@dataclass(frozen=True)
class ProcessPeak:
    pid: int
    role: str  # serve, intake, receiver, or the program's name
    kib: int  # VmHWM


@dataclass(frozen=True)
class PeakRSS:
    """The peak RSS (VmHWM) of each process of a server's tree, read while it runs."""

    processes: tuple[ProcessPeak, ...]

    @classmethod
    def of(cls, pids: list[int]) -> PeakRSS:
        peaks = ((pid, vm_hwm_kib(pid)) for pid in pids)
        return cls(tuple(ProcessPeak(pid, role_of(pid), kib) for pid, kib in peaks if kib))

    @property
    def total_kib(self) -> int:
        """Sum of the peaks: a little above the largest simultaneous total."""
        return sum(p.kib for p in self.processes)

    @property
    def largest(self) -> ProcessPeak | None:
        return max(self.processes, key=lambda p: p.kib, default=None)

    def summary(self) -> str:
        """E.g. ``serve 60.1, intake 3x 40.2 (max), receiver 2x 120.5 (max) MiB``."""
        roles: dict[str, list[int]] = {}
        for p in self.processes:
            roles.setdefault(p.role, []).append(p.kib)
        parts = [
            f"{role} {len(kibs)}x {max(kibs) / KIB:.1f} (max)"
            if len(kibs) > 1
            else f"{role} {kibs[0] / KIB:.1f}"
            for role, kibs in sorted(roles.items())
        ]
        return ", ".join(parts) + " MiB"


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of ``pid`` in KiB, None if unavailable."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmHWM:\s+(\d+)\s+kB", status, re.MULTILINE)
    return int(m.group(1)) if m else None


def role_of(pid: int) -> str:
    """What a process of backupmx's tree is, from its command line."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    if "backupmx.queue.intake" in args:
        return "intake"
    if "backupmx.receive.worker" in args:
        return "receiver"
    if "serve" in args:
        return "serve"
    return Path(args[0]).name or "?"


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses; skip past it.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


# --------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    elapsed: float
    reported: int  # messages smtp-source saw completing DATA
    returncode: int
    stderr: str


def smtp_source_command(
    port: int, *, sessions: int, messages: int, size: int, reuse: bool
) -> list[str]:
    """The ``smtp-source`` command line of `run_smtp_source` (``-c``: a counter per DATA)."""
    return [
        SMTP_SOURCE,
        "-c",  # print a counter per completed DATA (read by _last_count)
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
        "-M",
        HELO,
        *(["-d"] if reuse else []),
        f"127.0.0.1:{port}",
    ]


def run_smtp_source(
    port: int,
    *,
    sessions: int,
    messages: int,
    size: int,
    timeout: float,
    reuse: bool,
) -> LoadResult:
    """Send ``messages`` messages of ``size`` body bytes over ``sessions`` sessions."""
    cmd = smtp_source_command(port, sessions=sessions, messages=messages, size=size, reuse=reuse)
    start = time.monotonic()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return LoadResult(
            time.monotonic() - start,
            _last_count(out),
            -1,
            f"smtp-source timed out after {timeout:.0f} s",
        )
    elapsed = time.monotonic() - start
    return LoadResult(elapsed, _last_count(res.stdout), res.returncode, res.stderr.strip())


def _last_count(stdout: str) -> int:
    counts = re.findall(r"\d+", stdout)
    return int(counts[-1]) if counts else 0


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    server: str
    size: int
    sessions: int
    messages: int
    accepted: int
    elapsed: float
    rss: PeakRSS | None
    load: LoadResult

    @property
    def rate(self) -> float:
        return self.accepted / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def problem(self) -> str | None:
        """Why the figure is suspect, or None if the run was clean."""
        if self.load.returncode != 0:
            return f"smtp-source exit {self.load.returncode}: {self.load.stderr[-300:]}"
        if self.accepted != self.messages:
            return (
                f"held {self.accepted} of {self.messages} messages "
                f"(smtp-source counted {self.load.reported})"
            )
        return None

    def to_json(self) -> dict[str, object]:
        return asdict(self) | {
            "rate": self.rate,
            "peak_rss_kib": None if self.rss is None else self.rss.total_kib,
        }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def measure(
    factory: ServerFactory,
    *,
    size: int,
    sessions: int,
    messages: int,
    opts: Options,
) -> Measurement:
    """Start a fresh server, load it, stop it and count what it holds."""
    with tempfile.TemporaryDirectory(
        prefix="bench-accept-", dir=opts.workdir, ignore_cleanup_errors=True
    ) as tmp:
        server = factory(Path(tmp), free_port())
        try:
            try:
                server.start()
                load = run_smtp_source(
                    server.port,
                    sessions=sessions,
                    messages=messages,
                    size=size,
                    timeout=opts.timeout,
                    reuse=opts.reuse,
                )
                rss = server.peak_rss()
            except Exception:
                print(server.log_tail(), file=sys.stderr)
                raise
            finally:
                server.stop()
            accepted = server.held_count()
        finally:
            server.discard()
        m = Measurement(server.name, size, sessions, messages, accepted, load.elapsed, rss, load)
        if m.problem:
            print(f"  ! {server.name}: {m.problem}\n{server.log_tail(10)}", file=sys.stderr)
    print(
        f"  {m.server:11} {fmt_size(size):>7} x {sessions:2} sessions: {accepted} held "
        f"in {m.elapsed:6.2f} s = {m.rate:8.1f} msg/s"
        + (f"; peak RSS {fmt_mib(rss.total_kib)} summed: {rss.summary()}" if rss else ""),
        file=sys.stderr,
    )
    return m


# --------------------------------------------------------------------------
# Options, report, main
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    servers: tuple[str, ...]
    sizes: tuple[int, ...]
    sessions: tuple[int, ...]
    messages: int | None  # None: defaults depending on sessions
    repeat: int
    reuse: bool
    throughput: bool  # False: the memory test only
    memory_sizes: tuple[int, ...]  # empty: no memory test
    receivers: int | None  # None: not in the config (one per core)
    timeout: float
    workdir: str | None
    python: str
    json_path: Path | None
    quick: bool = False

    def messages_for(self, sessions: int) -> int:
        if self.messages is not None:
            return self.messages
        if self.quick:
            return QUICK_MESSAGES
        return DEFAULT_MESSAGES_ONE_SESSION if sessions == 1 else DEFAULT_MESSAGES


def server_names(text: str) -> tuple[str, ...]:
    """``--only``: a comma list of SERVERS, returned in SERVERS order."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    if not names or not names <= set(SERVERS):
        raise argparse.ArgumentTypeError(
            f"expected a comma list of {', '.join(SERVERS)}, not {text!r}"
        )
    return tuple(name for name in SERVERS if name in names)


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--only",
        type=server_names,
        metavar="SERVER,..",
        help=f"benchmark these servers only, of {', '.join(SERVERS)} (default: all)",
    )
    p.add_argument(
        "--messages",
        type=int,
        metavar="N",
        help=f"messages per cell (default {DEFAULT_MESSAGES}, "
        f"{DEFAULT_MESSAGES_ONE_SESSION} with 1 session)",
    )
    p.add_argument("--quick", action="store_true", help=f"{QUICK_MESSAGES} messages per cell")
    p.add_argument(
        "--sizes",
        default=",".join(map(str, DEFAULT_SIZES_KIB)),
        metavar="KIB,..",
        help="message body sizes in KiB (default %(default)s)",
    )
    p.add_argument(
        "--sessions",
        default=",".join(map(str, DEFAULT_SESSIONS)),
        metavar="N,..",
        help="parallel SMTP sessions (default %(default)s; 1 is also possible)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=DEFAULT_REPEAT,
        metavar="N",
        help="runs per cell, the median rate is reported (default %(default)s)",
    )
    p.add_argument(
        "--receivers",
        type=int,
        metavar="N",
        help="write `receivers = N` into backupmx's config (default: not written, "
        "one receiver worker per core)",
    )
    p.add_argument(
        "--reuse-connections",
        action="store_true",
        help="send all of a session's messages over one connection (smtp-source -d)",
    )
    memory_group = p.add_mutually_exclusive_group()
    memory_group.add_argument("--no-memory", action="store_true", help="skip the memory test")
    memory_group.add_argument(
        "--memory-only", action="store_true", help="the memory test only, no throughput matrix"
    )
    p.add_argument(
        "--memory-sizes",
        default=",".join(str(size // MIB) for size in MEMORY_SIZES),
        metavar="MIB,..",
        help=f"message sizes of the memory test ({MEMORY_SESSIONS} sessions, one message "
        "each) in MiB (default %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        metavar="S",
        help="limit per smtp-source run (default %(default).0f s)",
    )
    p.add_argument(
        "--workdir",
        metavar="DIR",
        help="where temporary server directories go (default: system temp dir); "
        "must be a real disk for durable figures, not tmpfs",
    )
    p.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter that runs backupmx (default: this one)",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write raw results as JSON")
    a = p.parse_args(argv)
    for name in ("messages", "repeat"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1")
    if a.receivers is not None and a.receivers < 0:
        p.error("--receivers must be >= 0 (0: one per core)")
    try:
        sizes = tuple(int(s) * KIB for s in a.sizes.split(","))
        sessions = tuple(int(s) for s in a.sessions.split(","))
        memory_sizes = tuple(int(s) * MIB for s in a.memory_sizes.split(","))
    except ValueError:
        p.error("--sizes, --sessions and --memory-sizes take comma-separated integers")
    servers: tuple[str, ...] = a.only or SERVERS
    # The memory test measures backupmx with its SQLite queue.
    memory = not a.no_memory and "backupmx" in servers
    if a.memory_only and not memory:
        p.error("--memory-only measures backupmx (SQLite); --only leaves it out")
    return Options(
        servers=servers,
        sizes=sizes,
        sessions=sessions,
        messages=a.messages,
        repeat=a.repeat,
        reuse=a.reuse_connections,
        throughput=not a.memory_only,
        memory_sizes=memory_sizes if memory else (),
        receivers=a.receivers,
        timeout=a.timeout,
        workdir=a.workdir,
        python=a.python,
        json_path=a.json,
        quick=a.quick,
    )


def make_factories(opts: Options) -> dict[str, ServerFactory]:
    start_timeout = 60.0

    def postfix(workdir: Path, port: int) -> Server:
        return PostfixServer(
            workdir,
            port,
            relay_domain=DOMAIN,
            primary=f"[{PRIMARY_HOST}]:{PRIMARY_PORT}",
            hostname=SERVER_HOSTNAME,
            timeout=start_timeout,
        )

    def backupmx(workdir: Path, port: int) -> Server:
        return BackupMXServer(
            workdir, port, python=opts.python, timeout=start_timeout, receivers=opts.receivers
        )

    def backupmx_pg(workdir: Path, port: int) -> Server:
        return BackupMXPostgres(
            workdir, port, python=opts.python, timeout=start_timeout, receivers=opts.receivers
        )

    return {"postfix": postfix, "backupmx": backupmx, "backupmx-pg": backupmx_pg}


def fmt_size(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB and size % MIB == 0 else f"{size // KIB} KiB"


def fmt_mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / KIB:.1f} MiB"


def filesystem_of(path: str) -> str:
    """Mount point and filesystem type holding ``path`` (from /proc/mounts)."""
    best, fstype = "", "?"
    real = os.path.realpath(path)
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "?"
    for line in mounts:
        parts = line.split()
        if len(parts) > 2:
            mnt = parts[1]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, fstype = mnt, parts[2]
    return f"{fstype} ({best})"


def postgres_version() -> str:
    """The PostgreSQL server's version; raises psycopg.Error if it cannot be reached."""
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=10) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def machine_info(opts: Options, load_before: float) -> list[str]:
    """Lines describing the machine and the set-up, for the report."""
    model = "?"
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        model = m.group(1).strip() if m else model
    except OSError:
        pass
    workdir = opts.workdir or tempfile.gettempdir()
    cores = len(os.sched_getaffinity(0))
    receivers = (
        f"one receiver worker per core ({cores}), the default"
        if not opts.receivers
        else f"receivers = {opts.receivers}"
    )
    lines = [
        f"cpu:        {model}",
        f"cpus:       {cores} usable of {os.cpu_count()}",
        f"kernel:     {platform.system()} {platform.release()}",
        f"postfix:    {postfix_version()}",
        f"python:     {platform.python_version()} ({opts.python} runs backupmx)",
        f"backupmx:   {receivers}",
        f"queue fs:   {filesystem_of(workdir)} under {workdir}",
    ]
    if "backupmx-pg" in opts.servers and opts.throughput:
        lines.append(
            f"postgresql: {postgres_version()} at {POSTGRES_SERVER.split('@')[1]} "
            "(backupmx-pg), a fresh database per run"
        )
    lines += [
        "load:       smtp-source, "
        + (
            "all messages of a session on one connection"
            if opts.reuse
            else "one connection per message"
        ),
        f"load avg:   {load_before:.2f} before the run, {os.getloadavg()[0]:.2f} after (1 min); "
        "other work on the machine distorts the figures",
    ]
    return lines


def median_rate(runs: list[Measurement]) -> float | None:
    return statistics.median(m.rate for m in runs) if runs else None


def throughput_table(opts: Options, results: list[Measurement]) -> list[str]:
    """Median msg/s per cell and server, backupmx's ratios to Postfix, the targets."""
    header = (
        f"{'size':>7} {'sessions':>8} {'messages':>8} {'postfix msg/s':>14} "
        f"{'backupmx msg/s':>15} {'ratio':>6} {'target':>7} {'':4} "
        f"{'backupmx-pg msg/s':>18} {'ratio':>6}"
    )
    lines = [header, "-" * len(header)]
    for size in opts.sizes:
        for sessions in opts.sessions:
            cell = [m for m in results if m.size == size and m.sessions == sessions]
            rate = {name: median_rate([m for m in cell if m.server == name]) for name in SERVERS}
            postfix = rate["postfix"]
            ratio = {name: _ratio_of(rate[name], postfix) for name in ("backupmx", "backupmx-pg")}
            target = RATIO_TARGETS.get(size) if sessions >= RATIO_TARGET_MIN_SESSIONS else None
            sqlite_ratio = ratio["backupmx"]
            verdict = (
                ""
                if sqlite_ratio is None or target is None
                else ("ok" if sqlite_ratio >= target else "FAIL")
            )
            flag = "!" if any(m.problem for m in cell) else ""
            lines.append(
                f"{fmt_size(size):>7} {sessions:>8} {opts.messages_for(sessions):>8} "
                f"{_num(postfix):>14} {_num(rate['backupmx']):>15} "
                f"{_ratio(ratio['backupmx']):>6} "
                f"{'-' if target is None else f'>={target:.1f}':>7} {verdict:4} "
                f"{_num(rate['backupmx-pg']):>18} {_ratio(ratio['backupmx-pg']):>6}{flag}"
            )
    lines.append(
        f"ratio: to postfix; target (from {RATIO_TARGET_MIN_SESSIONS} sessions) "
        "judged on backupmx (SQLite queue); backupmx-pg for comparison"
    )
    if opts.repeat > 1:
        lines.append(f"median of {opts.repeat} runs per cell, the servers interleaved")
    return lines


def memory_table(opts: Options, memory: list[Measurement]) -> list[str]:
    """Per message size: the highest summed peak RSS of the runs, and its largest process."""
    header = (
        f"{'size':>7} {'held':>7} {'seconds':>8} {'summed peak RSS':>16} "
        f"{'growth':>15} {'largest process':>25} {'target':>10} {'':4}"
    )
    lines = [
        f"memory: backupmx (SQLite), {MEMORY_SESSIONS} sessions each sending one message "
        f"(highest of {opts.repeat} run{'s' if opts.repeat > 1 else ''} per size)",
        "",
        header,
        "-" * len(header),
    ]
    previous: tuple[int, int] | None = None  # (size, summed peak) of the row above
    breakdown = []
    for size in opts.memory_sizes:
        runs = [m for m in memory if m.size == size]
        worst = max(runs, key=lambda m: m.rss.total_kib if m.rss else 0)
        rss = worst.rss
        total = rss.total_kib if rss else None
        largest = rss.largest if rss else None
        growth = (
            f"+{(total - previous[1]) / KIB / ((size - previous[0]) / MIB):.1f} MiB/MiB"
            if total is not None and previous is not None and size != previous[0]
            else "-"
        )
        target = f"< {MEMORY_TARGET_MIB} MiB" if size == MEMORY_SIZE else "-"
        verdict = (
            ""
            if size != MEMORY_SIZE
            else ("ok" if total and total / KIB < MEMORY_TARGET_MIB else "FAIL")
        )
        flag = "!" if any(m.problem for m in runs) else ""
        held = f"{min(m.accepted for m in runs)}/{worst.messages}"
        largest_text = f"{fmt_mib(largest.kib)} ({largest.role})" if largest else "n/a"
        lines.append(
            f"{fmt_size(size):>7} {held:>7} {worst.elapsed:>8.1f} {fmt_mib(total):>16} "
            f"{growth:>15} {largest_text:>25} {target:>10} {verdict:4}{flag}"
        )
        if rss:
            breakdown.append(
                f"  {fmt_size(size):>7}: {len(rss.processes)} processes, {rss.summary()}"
            )
            previous = (size, rss.total_kib)
    lines += [
        "summed peak RSS: VmHWM of every process under serve (serve, its intake, the receiver",
        "  workers and their intakes) added up; each is that process's own peak and the peaks",
        "  need not coincide, so the sum slightly over-estimates the largest simultaneous total",
        "growth: extra MiB of the summed peak per extra MiB of message size; with "
        f"{MEMORY_SESSIONS} messages",
        f"  in flight, {MEMORY_SESSIONS} MiB/MiB would be one whole copy of each in memory",
        "per process (peak RSS):",
        *breakdown,
    ]
    return lines


def report(
    opts: Options, info: list[str], results: list[Measurement], memory: list[Measurement]
) -> str:
    lines = [
        "",
        "Durable accept throughput, backup MX for example.test "
        f"(primary {PRIMARY_HOST}:{PRIMARY_PORT} refuses connections)",
        "",
    ]
    lines += [*info, ""]
    if opts.throughput:
        lines += throughput_table(opts, results)
    if memory:
        lines += ["", *memory_table(opts, memory)]
    if any(m.problem for m in [*results, *memory]):
        lines.append("! = some messages were not held or smtp-source failed; see stderr")
    return "\n".join(lines)


def _num(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1f}"


def _ratio_of(rate: float | None, postfix: float | None) -> float | None:
    return rate / postfix if rate is not None and postfix else None


def _ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def check_primary_closed() -> None:
    """The "primary" must refuse connections, or mail would leave the queue."""
    try:
        with socket.create_connection((PRIMARY_HOST, PRIMARY_PORT), timeout=2.0):
            pass
    except OSError:
        return
    raise SystemExit(
        f"{PRIMARY_HOST}:{PRIMARY_PORT} accepts connections; "
        "the primary MX must be unreachable for this benchmark"
    )


def check_tools(opts: Options) -> None:
    if shutil.which(SMTP_SOURCE) is None:
        raise SystemExit("smtp-source not found (Debian package: postfix)")
    if "postfix" in opts.servers and opts.throughput and os.geteuid() != 0:
        raise SystemExit("the private Postfix instance must be started as root")
    if {"backupmx", "backupmx-pg"} & set(opts.servers):
        res = subprocess.run(
            [opts.python, "-m", "backupmx", "--help"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if res.returncode != 0:
            raise SystemExit(
                f"`{opts.python} -m backupmx --help` fails; is the server "
                f"installed? (use --only postfix meanwhile)\n{res.stderr[-500:]}"
            )
    if "backupmx-pg" in opts.servers and opts.throughput:
        try:
            postgres_version()
        except Exception as exc:  # psycopg missing, or the server down
            raise SystemExit(
                f"PostgreSQL at {POSTGRES_ADMIN_URL} is needed for backupmx-pg "
                f"(or leave it out with --only): {exc}"
            ) from exc


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so that ``finally`` blocks stop the servers."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_all(
    opts: Options, factories: dict[str, ServerFactory]
) -> tuple[list[Measurement], list[Measurement]]:
    """The throughput matrix, then the memory test."""
    results: list[Measurement] = []
    if opts.throughput:
        for size in opts.sizes:
            for sessions in opts.sessions:
                for _ in range(opts.repeat):
                    # Interleave the servers so slow drift affects them alike.
                    for name in opts.servers:
                        results.append(
                            measure(
                                factories[name],
                                size=size,
                                sessions=sessions,
                                messages=opts.messages_for(sessions),
                                opts=opts,
                            )
                        )
    memory = [
        measure(
            factories["backupmx"],
            size=size,
            sessions=MEMORY_SESSIONS,
            messages=MEMORY_SESSIONS,
            opts=opts,
        )
        for size in opts.memory_sizes
        for _ in range(opts.repeat)
    ]
    return results, memory


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    check_tools(opts)
    check_primary_closed()
    load_before = os.getloadavg()[0]
    if load_before > 0.5 * len(os.sched_getaffinity(0)):
        print(
            f"warning: load average is {load_before:.2f}; the figures will be noisy",
            file=sys.stderr,
        )
    factories = make_factories(opts)
    with sigterm_as_exit():
        try:
            results, memory = run_all(opts, factories)
        except ServerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    info = machine_info(opts, load_before)
    print(report(opts, info, results, memory))
    if opts.json_path is not None:
        opts.json_path.write_text(
            json.dumps(
                {
                    "machine": info,
                    "runs": [m.to_json() for m in results],
                    "memory": [m.to_json() for m in memory],
                },
                indent=2,
            )
        )
    return 1 if any(m.problem for m in [*results, *memory]) else 0


if __name__ == "__main__":
    sys.exit(main())
