"""Durable accept throughput of backupmx versus Postfix, both as a backup MX.

What is measured
    How many messages per second each server accepts *durably* over SMTP
    while acting as the backup MX for ``example.test`` whose primary
    (``127.0.0.1:9``) refuses connections, so every accepted message must be
    held in the server's queue.  Matrix: message body 10 KiB and 100 KiB x
    1, 10 and 50 parallel SMTP sessions.  Plus a memory test: 50 parallel
    sessions each sending one 10 MiB message to backupmx, reporting the
    server's peak RSS (VmHWM) against the 768 MiB target.

How
    For every cell a *fresh* server is started in its own temporary directory
    on a free loopback port: a private Postfix instance (``postfix_backup.py``)
    or ``python -m backupmx --config CONF serve``.  Postfix's ``smtp-source``
    generates the load (one message per connection unless
    ``--reuse-connections``); the wall-clock time around it is measured with
    ``time.monotonic()``.  The server is then stopped and the messages it
    actually holds are counted -- queue files for Postfix, ``backupmx queue
    stats --json`` for backupmx -- and msg/s = held messages / elapsed time.
    smtp-source's own count is only used to flag discrepancies.  backupmx's
    peak RSS is read from /proc/PID/status (VmHWM, summed over the server
    process and its children) just before it is stopped.

Run (as root, Postfix needs it) from the repository root::

    .venv/bin/python bench/accept.py                  # full matrix + memory test
    .venv/bin/python bench/accept.py --quick          # ~300 messages per cell
    .venv/bin/python bench/accept.py --only postfix   # reference figures only
    .venv/bin/python bench/accept.py --only backupmx --sizes 10 --sessions 50

Progress goes to stderr, the result table to stdout (``--json FILE`` also
saves the raw figures).  Only loopback addresses are used; every server and
temporary directory is removed on exit, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
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
from typing import Final, Protocol

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
DEFAULT_SESSIONS: Final = (1, 10, 50)
DEFAULT_MESSAGES: Final = 3000
DEFAULT_MESSAGES_ONE_SESSION: Final = 1000
QUICK_MESSAGES: Final = 300

#: Minimum backupmx/postfix ratio per body size, for 10 and 50 sessions.
RATIO_TARGETS: Final[dict[int, float]] = {10 * KIB: 1.5, 100 * KIB: 1.0}
RATIO_TARGET_MIN_SESSIONS: Final = 10

MEMORY_SESSIONS: Final = 50
MEMORY_SIZE: Final = 10 * MIB
MEMORY_TARGET_MIB: Final = 768

BACKUPMX_CONF: Final = """\
hostname = "{hostname}"
listen = ["127.0.0.1:{port}"]
database = "sqlite:///{db}"

[limits]
max_connections = 200
max_connections_per_ip = 200
max_message_size = "50MiB"

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

    def peak_rss_kib(self) -> int | None:
        """Peak RSS so far in KiB, or None if not measured (called before stop())."""

    def log_tail(self, lines: int = 20) -> str:
        """Last lines of the server log, for error reports."""


ServerFactory = Callable[[Path, int], Server]


class PostfixServer(PostfixBackupMX):
    """Postfix as a benchmark :class:`Server` (its RSS is not measured)."""

    def peak_rss_kib(self) -> int | None:
        # Postfix is many short-lived processes; a per-process peak is meaningless.
        return None


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
    """``python -m backupmx serve`` with a throw-away config and SQLite queue."""

    name: Final = "backupmx"

    def __init__(self, workdir: Path, port: int, *, python: str, timeout: float) -> None:
        self.workdir = workdir
        self._port = port
        self.python = python
        self.timeout = timeout
        self.conf = workdir / "backupmx.toml"
        self.log = workdir / "backupmx.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self._port

    def write_config(self) -> None:
        self.conf.write_text(
            BACKUPMX_CONF.format(
                hostname=SERVER_HOSTNAME,
                port=self.port,
                db=self.workdir / "queue.db",
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
                    f"warning: backupmx ignored SIGTERM for {self.timeout:.0f} s, killing it",
                    file=sys.stderr,
                )
        # Kill whatever is left of the process group (workers, or a hung server).
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=self.timeout)

    def held_count(self) -> int:
        return backupmx_held_count(self.python, self.conf, self.timeout)

    def peak_rss_kib(self) -> int | None:
        if self._proc is None or self._proc.poll() is not None:
            return None
        return sum(filter(None, (vm_hwm_kib(pid) for pid in process_tree(self._proc.pid))))

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of ``pid`` in KiB, None if unavailable."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmHWM:\s+(\d+)\s+kB", status, re.MULTILINE)
    return int(m.group(1)) if m else None


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
    peak_rss_kib: int | None
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
            server.start()
            load = run_smtp_source(
                server.port,
                sessions=sessions,
                messages=messages,
                size=size,
                timeout=opts.timeout,
                reuse=opts.reuse,
            )
            rss = server.peak_rss_kib()
        except Exception:
            print(server.log_tail(), file=sys.stderr)
            raise
        finally:
            server.stop()
        accepted = server.held_count()
        m = Measurement(server.name, size, sessions, messages, accepted, load.elapsed, rss, load)
        if m.problem:
            print(f"  ! {server.name}: {m.problem}\n{server.log_tail(10)}", file=sys.stderr)
    print(
        f"  {m.server:8} {fmt_size(size):>7} x {sessions:2} sessions: {accepted} held "
        f"in {m.elapsed:6.2f} s = {m.rate:8.1f} msg/s"
        + (f", peak RSS {fmt_mib(rss)}" if rss else ""),
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
    memory: bool
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


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--only", choices=("postfix", "backupmx"), help="benchmark one server only")
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
        help="parallel SMTP sessions (default %(default)s)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="runs per cell, the median rate is reported (default 1)",
    )
    p.add_argument(
        "--reuse-connections",
        action="store_true",
        help="send all of a session's messages over one connection (smtp-source -d)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the 50 x 10 MiB memory test")
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
    try:
        sizes = tuple(int(s) * KIB for s in a.sizes.split(","))
        sessions = tuple(int(s) for s in a.sessions.split(","))
    except ValueError:
        p.error("--sizes and --sessions take comma-separated integers")
    return Options(
        servers=(a.only,) if a.only else ("postfix", "backupmx"),
        sizes=sizes,
        sessions=sessions,
        messages=a.messages,
        repeat=a.repeat,
        reuse=a.reuse_connections,
        memory=not a.no_memory and a.only != "postfix",
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
        return BackupMXServer(workdir, port, python=opts.python, timeout=start_timeout)

    return {"postfix": postfix, "backupmx": backupmx}


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


def machine_info(opts: Options, load_before: float) -> list[str]:
    """Lines describing the machine and the set-up, for the report."""
    model = "?"
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        model = m.group(1).strip() if m else model
    except OSError:
        pass
    workdir = opts.workdir or tempfile.gettempdir()
    return [
        f"cpus:       {len(os.sched_getaffinity(0))} usable of {os.cpu_count()} ({model})",
        f"kernel:     {platform.system()} {platform.release()}",
        f"postfix:    {postfix_version()}",
        f"python:     {platform.python_version()} ({opts.python} runs backupmx)",
        f"queue fs:   {filesystem_of(workdir)} under {workdir}",
        "load:       smtp-source, "
        + (
            "all messages of a session on one connection"
            if opts.reuse
            else "one connection per message"
        ),
        f"load avg:   {load_before:.2f} before the run, {os.getloadavg()[0]:.2f} after (1 min); "
        "other work on the machine distorts the figures",
    ]


def median_rate(runs: list[Measurement]) -> float | None:
    return statistics.median(m.rate for m in runs) if runs else None


def report(
    opts: Options, info: list[str], results: list[Measurement], memory: Measurement | None
) -> str:
    lines = [
        "",
        "Durable accept throughput, backup MX for example.test "
        f"(primary {PRIMARY_HOST}:{PRIMARY_PORT} refuses connections)",
        "",
    ]
    lines += [*info, ""]
    header = (
        f"{'size':>7} {'sessions':>8} {'messages':>8} {'postfix msg/s':>14} "
        f"{'backupmx msg/s':>15} {'ratio':>6} {'target':>7} {'':4} {'backupmx peak RSS':>17}"
    )
    lines += [header, "-" * len(header)]
    for size in opts.sizes:
        for sessions in opts.sessions:
            cell = [m for m in results if m.size == size and m.sessions == sessions]
            pf = median_rate([m for m in cell if m.server == "postfix"])
            bx_runs = [m for m in cell if m.server == "backupmx"]
            bx = median_rate(bx_runs)
            rss = max((m.peak_rss_kib or 0 for m in bx_runs), default=0) or None
            ratio = bx / pf if bx is not None and pf else None
            target = RATIO_TARGETS.get(size) if sessions >= RATIO_TARGET_MIN_SESSIONS else None
            verdict = (
                "" if ratio is None or target is None else ("ok" if ratio >= target else "FAIL")
            )
            flag = "!" if any(m.problem for m in cell) else ""
            lines.append(
                f"{fmt_size(size):>7} {sessions:>8} {opts.messages_for(sessions):>8} "
                f"{_num(pf):>14} {_num(bx):>15} "
                f"{'-' if ratio is None else f'{ratio:.2f}':>6} "
                f"{'-' if target is None else f'>={target:.1f}':>7} {verdict:4} "
                f"{fmt_mib(rss) if bx_runs else '-':>17}{flag}"
            )
    if opts.repeat > 1:
        lines.append(f"(median of {opts.repeat} runs per cell)")
    if any(m.problem for m in results):
        lines.append("! = some messages were not held or smtp-source failed; see stderr")
    if memory is not None:
        rss_mib = (memory.peak_rss_kib or 0) / KIB
        verdict = "ok" if memory.peak_rss_kib and rss_mib < MEMORY_TARGET_MIB else "FAIL"
        lines += [
            "",
            f"memory: {MEMORY_SESSIONS} sessions x one {fmt_size(MEMORY_SIZE)} message: "
            f"backupmx peak RSS {fmt_mib(memory.peak_rss_kib)} "
            f"(target < {MEMORY_TARGET_MIB} MiB) {verdict}; "
            f"{memory.accepted}/{memory.messages} held in {memory.elapsed:.1f} s"
            + (f"  ! {memory.problem}" if memory.problem else ""),
        ]
    return "\n".join(lines)


def _num(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1f}"


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
    if "postfix" in opts.servers and os.geteuid() != 0:
        raise SystemExit("the private Postfix instance must be started as root")
    if "backupmx" in opts.servers:
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
) -> tuple[list[Measurement], Measurement | None]:
    """The throughput matrix, then the memory test."""
    results: list[Measurement] = []
    for size in opts.sizes:
        for sessions in opts.sessions:
            for _ in range(opts.repeat):
                # Interleave the servers so slow drift affects both alike.
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
    memory = None
    if opts.memory:
        memory = measure(
            factories["backupmx"],
            size=MEMORY_SIZE,
            sessions=MEMORY_SESSIONS,
            messages=MEMORY_SESSIONS,
            opts=opts,
        )
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
                    "runs": [asdict(m) | {"rate": m.rate} for m in results],
                    "memory": None if memory is None else asdict(memory) | {"rate": memory.rate},
                },
                indent=2,
            )
        )
    return 1 if any(m.problem for m in results) or (memory and memory.problem) else 0


if __name__ == "__main__":
    sys.exit(main())
