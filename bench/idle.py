"""Idle cost with a large held queue: backupmx's CPU while it holds mail for a primary that is down.

What is measured
    The CPU that ``backupmx serve`` spends doing nothing useful: it holds N
    recipients for ``example.test`` whose primary (``127.0.0.1:9``) refuses
    connections, has found out that the primary is down, and no mail arrives.
    A queue whose cost follows what is pending *and due* spends next to nothing
    here, whatever N; one that walks the held rows on every tick spends in
    proportion to N.  Default N: 100,000 and 1,000,000 (``--quick``: 1,000 and
    100,000), 100 recipients per message.

How
    For every N a fresh queue: an SQLite file in a temporary directory, or with
    ``--postgres ADMIN_URL`` a fresh database ``backupmx_idle_bench`` created
    there (and dropped after).  ``backupmx db upgrade`` creates the schema; the
    rows are then inserted directly with a plain SQLAlchemy engine, in batches,
    as the intake would write them (``backupmx.queue.inserter.Inserter``:
    every recipient queued and due now), plus the domain's ``domains`` row in
    state ``unknown`` (inserted only if missing).  Then ``backupmx serve``
    starts with defaults (a static route to the dead primary; ``--retry-min``
    to change ``delivery.retry_min``; the metrics endpoint on a free loopback
    port, not scraped unless ``--scrape``; ``--domains N`` adds N backed-up
    domains with nothing pending and their primary up; with ``--systemd`` a
    ``NOTIFY_SOCKET`` as systemd's ``Type=notify`` gives one, so that the
    server reports its queue in ``STATUS=`` every ``metrics.status_interval``,
    as it does when deployed), the benchmark waits until the
    ``domains`` row says ``down`` and ``--settle`` seconds more, so that
    start-up work is over, and measures for ``--seconds``:

    * CPU: utime + stime (+ the reaped children's cutime + cstime) from
      /proc/PID/stat of the serve process and all its descendants (the intake
      process), before and after the window, as a percentage of one core.
      With PostgreSQL, the CPU of the server's PostgreSQL backends
      (pg_stat_activity of the bench database) is shown apart ("db CPU").
      SQLite works inside the backupmx processes, so it is in the first figure.
    * RSS: VmRSS summed over the same processes, at the end of the window.

    Afterwards the server is stopped and the recipients are counted by state:
    every one of the N must still be ``queued`` (nothing lost, nothing sent).

Run from the repository root::

    .venv/bin/python bench/idle.py                        # 100,000 and 1,000,000 held
    .venv/bin/python bench/idle.py --quick --seconds 10   # 1,000 and 100,000, a short window
    .venv/bin/python bench/idle.py --recipients 1000000 --seconds 300
    .venv/bin/python bench/idle.py --systemd --scrape 15   # as deployed: STATUS= and Prometheus
    .venv/bin/python bench/idle.py --postgres postgresql://postgres@127.0.0.1:5432/postgres

Progress goes to stderr, the result table to stdout (``--json FILE`` also saves
the raw figures).  Every wait is bounded by ``--timeout``; the server, the
temporary directory and the PostgreSQL database are removed on exit, also on
error or Ctrl-C.  Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from accept import (
    DOMAIN,
    KIB,
    PRIMARY_HOST,
    PRIMARY_PORT,
    REPO_ROOT,
    SERVER_HOSTNAME,
    BackupMXServer,
    check_primary_closed,
    filesystem_of,
    free_port,
    process_tree,
    sigterm_as_exit,
)
from postfix_backup import ServerError
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(REPO_ROOT))
from tests.support.notify_socket import NotifySocket  # systemd's end of sd_notify
from tests.support.server import write_config  # the tests' TOML writer

RECIPIENTS: Final = (100_000, 1_000_000)
QUICK_RECIPIENTS: Final = (1_000, 100_000)
RECIPIENTS_PER_MESSAGE: Final = 100
INSERT_MESSAGES: Final = 500  # messages per insert transaction (50,000 recipients)
POSTGRES_DATABASE: Final = "backupmx_idle_bench"
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
POLL_SECONDS: Final = 0.5
PERIODIC_JOBS_SECONDS: Final = 60  # delivery.housekeeping_interval's default


# --------------------------------------------------------------------------- processes


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo) and how many cores this process may use."""
    model = "?"
    with suppress(OSError):
        found = re.search(
            r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE
        )
        model = found.group(1).strip() if found else model
    return f"{model}, {len(os.sched_getaffinity(0))} usable of {os.cpu_count()} cores"


def process_label(pid: int, root: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return str(pid)
    if "backupmx.queue.intake" in cmdline:
        return "intake"
    return "serve" if pid == root else cmdline.split(" ", 1)[0].rsplit("/", 1)[-1] or str(pid)


def cpu_ticks(pid: int, children: bool = True) -> int | None:
    """utime + stime (+ cutime + cstime of reaped children) of `pid`, in clock ticks."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; fields 14-17 follow it.
    fields = stat.rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return utime + stime + (cutime + cstime if children else 0)


def tree_cpu(root: int) -> dict[int, tuple[str, int]]:
    """pid -> (label, CPU ticks) for `root` and all its live descendants."""
    found = {}
    for pid in process_tree(root):
        ticks = cpu_ticks(pid)
        if ticks is not None:
            found[pid] = (process_label(pid, root), ticks)
    return found


def cpu_spent(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]]) -> float:
    """CPU seconds between two `tree_cpu` readings (a process that started in between
    counts whole; one that ended and was reaped is in its parent's cutime)."""
    ticks = sum(t - before.get(pid, ("", 0))[1] for pid, (_, t) in after.items())
    return ticks / CLOCK_TICKS


def cpu_by_label(
    before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]]
) -> dict[str, float]:
    spent: dict[str, float] = {}
    for pid, (label, ticks) in after.items():
        spent[label] = spent.get(label, 0.0) + (ticks - before.get(pid, ("", 0))[1]) / CLOCK_TICKS
    return spent


def status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` line of /proc/PID/status (VmRSS, VmHWM), None if unavailable."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{key}:\s+(\d+)\s+kB", status, re.MULTILINE)
    return int(found.group(1)) if found else None


def tree_rss_kib(root: int) -> int:
    """VmRSS summed over `root` and its live descendants."""
    return sum(filter(None, (status_kib(pid, "VmRSS") for pid in process_tree(root))))


# --------------------------------------------------------------------------- database


class BenchDatabase:
    """The queue database of one run: an SQLite file in `directory`, or a fresh
    PostgreSQL database `name` created with `admin_url` (dropped by `close`)."""

    def __init__(self, directory: Path, admin_url: str | None, name: str) -> None:
        self.admin_url = admin_url
        self.name = name
        self.path = directory / "queue.db"
        if admin_url is None:
            self.url = f"sqlite:///{self.path}"
        else:
            self._admin(
                f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"'
            )
            self.url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        self._engine: Engine | None = None

    @property
    def backend(self) -> str:
        return "sqlite" if self.admin_url is None else "postgresql"

    def _admin(self, *statements: str) -> None:
        assert self.admin_url is not None
        engine = create_engine(
            make_url(self.admin_url).set(drivername="postgresql+psycopg"),
            isolation_level="AUTOCOMMIT",
        )
        try:
            with engine.connect() as conn:
                for statement in statements:
                    conn.exec_driver_sql(statement)
        finally:
            engine.dispose()

    @property
    def engine(self) -> Engine:
        """A plain sync engine (the one the project's group-commit writers use)."""
        if self._engine is None:
            from backupmx.queue.database import open_writer_engine

            self._engine = open_writer_engine(self.url)
        return self._engine

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.begin() as conn:
            return conn.execute(text(sql), params).scalar()

    def recipient_states(self) -> dict[str, int]:
        with self.engine.begin() as conn:
            rows = conn.execute(text("SELECT state, count(*) FROM recipients GROUP BY state"))
            return {str(state): int(count) for state, count in rows}

    def domain_state(self, domain: str) -> str | None:
        state = self.scalar("SELECT state FROM domains WHERE name = :name", name=domain)
        return None if state is None else str(state)

    def size_bytes(self) -> int:
        """The .db file and its WAL, or pg_database_size."""
        if self.admin_url is None:
            return sum(
                p.stat().st_size
                for p in (self.path, self.path.with_name(self.path.name + "-wal"))
                if p.exists()
            )
        return int(self.scalar("SELECT pg_database_size(current_database())"))

    def backend_pids(self) -> list[int]:
        """PostgreSQL backends serving this database, other than ours."""
        if self.admin_url is None:
            return []
        with self.engine.begin() as conn:
            rows = conn.execute(
                text(
                    "SELECT pid FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
            return [int(pid) for (pid,) in rows]

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self.admin_url is not None:
            self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def postgres_ticks(pids: Sequence[int]) -> dict[int, tuple[str, int]]:
    found = {}
    for pid in pids:
        ticks = cpu_ticks(pid, children=False)
        if ticks is not None:
            found[pid] = ("postgres", ticks)
    return found


def upgrade_schema(python: str, conf: Path, timeout: float) -> str:
    """``backupmx db upgrade`` with the server's own config: the schema of the current code."""
    cmd = [python, "-m", "backupmx", "--config", str(conf), "db", "upgrade", "--json"]
    res = subprocess.run(
        cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    if res.returncode != 0:
        raise ServerError(f"{' '.join(cmd[2:])} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    return str(json.loads(res.stdout).get("revision"))


def quiet_domains(count: int) -> list[str]:
    return [f"d{i}.bench.test" for i in range(count)]


def add_quiet_domains(db: BenchDatabase, count: int) -> None:
    """`count` more backed-up domains with nothing pending and their primary up, as a
    server backing many domains up knows them (``domains`` rows in state ``up``)."""
    now = datetime.now(UTC)
    rows = [
        {"name": name, "state": "up", "since": now, "updated_at": now}
        for name in quiet_domains(count)
    ]
    if rows:
        with db.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO domains (name, state, since, updated_at) "
                    "VALUES (:name, :state, :since, :updated_at)"
                ),
                rows,
            )


def fill(db: BenchDatabase, recipients: int, deadline: float) -> float:
    """Insert `recipients` queued recipients, 100 per message; returns the seconds it took."""
    from backupmx.queue.inserter import Inserter
    from backupmx.queue.records import BytesBody, NewMessage, NewRecipient, new_queue_id

    now = datetime.now(UTC)
    inserter = Inserter(db.engine.dialect)
    count = math.ceil(recipients / RECIPIENTS_PER_MESSAGE)
    started = time.monotonic()
    for first in range(0, count, INSERT_MESSAGES):
        if time.monotonic() > deadline:
            raise ServerError(f"filling the queue took longer than the timeout ({first} messages)")
        batch = []
        for m in range(first, min(first + INSERT_MESSAGES, count)):
            body = (
                f"From: sender@bench.test\r\nTo: rcpt@{DOMAIN}\r\nSubject: idle bench {m}\r\n"
                f"Message-ID: <{m}@bench.test>\r\n\r\nheld while the primary is down\r\n"
            ).encode()
            batch.append(
                NewMessage(
                    id=new_queue_id(),
                    sender="sender@bench.test",
                    recipients=[
                        NewRecipient(f"r{r}@{DOMAIN}", DOMAIN)
                        for r in range(
                            m * RECIPIENTS_PER_MESSAGE,
                            min((m + 1) * RECIPIENTS_PER_MESSAGE, recipients),
                        )
                    ],
                    body=BytesBody(body),
                    client_ip="127.0.0.1",
                    client_helo="client.bench.test",
                    protocol="ESMTP",
                    session_id="idle-bench",
                    received_at=now,
                )
            )
        with db.engine.begin() as conn:
            inserter.insert(conn, batch, now)  # messages, bodies, recipients, domains
    return time.monotonic() - started


# --------------------------------------------------------------------------- server


class ConfiguredServer(BackupMXServer):
    """``backupmx serve`` with the config written from a settings dict."""

    def __init__(
        self, workdir: Path, settings: dict[str, Any], *, python: str, timeout: float
    ) -> None:
        port = free_port()
        super().__init__(workdir, port, python=python, timeout=timeout)
        self.metrics_port = free_port()
        self.settings = {
            "hostname": SERVER_HOSTNAME,
            "listen": [f"127.0.0.1:{port}"],
            **settings,
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}", **settings.get("metrics", {})},
        }

    @property
    def pid(self) -> int:
        if self._proc is None or self._proc.poll() is not None:
            raise ServerError(f"backupmx serve is not running:\n{self.log_tail()}")
        return self._proc.pid

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def write_config(self) -> None:
        write_config(self.conf, self.settings)

    def scrape(self, timeout: float = 10.0) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bytes(response.read()).decode()


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool]
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if not alive():
            raise ServerError(f"backupmx serve exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise ServerError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_SECONDS)


def cleanup(*steps: Callable[[], object] | None) -> None:
    """Run every step, even when one fails (the failure is reported, not raised)."""
    for step in steps:
        if step is None:
            continue
        try:
            step()
        except Exception as error:
            progress(f"warning: cleanup {getattr(step, '__qualname__', step)} failed: {error!r}")


@contextmanager
def notify_socket(directory: Path, enabled: bool) -> Iterator[Callable[[], list[str]]]:
    """With `enabled`, ``NOTIFY_SOCKET`` in the environment the server inherits, bound
    here as systemd binds it (the tests' `NotifySocket`); yields a function that
    returns the ``STATUS=`` values sent so far."""
    if not enabled:
        yield list
        return
    receiver = NotifySocket(str(directory / "notify.sock"))

    def statuses() -> list[str]:
        receiver.drain()
        return [message["STATUS"] for message in receiver.received if "STATUS" in message]

    os.environ["NOTIFY_SOCKET"] = receiver.address
    try:
        yield statuses
    finally:
        os.environ.pop("NOTIFY_SOCKET", None)
        receiver.close()


@contextmanager
def workspace(prefix: str, workdir: str | None) -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class Idle:
    backend: str
    held: int
    fill_seconds: float
    down_after: float  # serve started -> domain marked down
    startup_cpu: float  # CPU seconds from serve start to the window
    window: float
    cpu_seconds: float
    cpu_by_process: dict[str, float]
    db_cpu_seconds: float | None  # PostgreSQL backends; None for SQLite
    rss_kib: int
    states_after: dict[str, int] = field(default_factory=dict)
    scrapes: int = 0
    statuses: int = 0  # STATUS= lines received in the window (--systemd)
    last_status: str = ""

    @property
    def cpu_percent(self) -> float:
        return 100.0 * self.cpu_seconds / self.window if self.window > 0 else 0.0

    @property
    def db_cpu_percent(self) -> float | None:
        if self.db_cpu_seconds is None or self.window <= 0:
            return None
        return 100.0 * self.db_cpu_seconds / self.window

    @property
    def still_queued(self) -> int:
        return self.states_after.get("queued", 0)

    @property
    def problem(self) -> str | None:
        if self.still_queued != self.held or sum(self.states_after.values()) != self.held:
            return f"after the run: {self.states_after}, expected {self.held} queued"
        return None


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def idle_run(held: int, opts: argparse.Namespace) -> Idle:
    with (
        workspace("bench-idle-", opts.workdir) as directory,
        notify_socket(directory, opts.systemd) as statuses,
    ):
        db = BenchDatabase(directory, opts.postgres, POSTGRES_DATABASE)
        server: ConfiguredServer | None = None
        try:
            settings: dict[str, Any] = {
                "database": db.url,
                "domain": [
                    {"name": name, "primary": [f"{PRIMARY_HOST}:{PRIMARY_PORT}"]}
                    for name in [DOMAIN, *quiet_domains(opts.domains)]
                ],
            }
            if opts.retry_min:
                settings["delivery"] = {"retry_min": opts.retry_min}
            server = ConfiguredServer(directory, settings, python=opts.python, timeout=opts.timeout)
            server.write_config()
            revision = upgrade_schema(opts.python, server.conf, opts.timeout)
            progress(f"{db.backend} {held:,}: schema at {revision}, filling")
            filled = fill(db, held, time.monotonic() + opts.timeout)
            add_quiet_domains(db, opts.domains)
            progress(f"{db.backend} {held:,}: filled in {filled:.1f} s, starting serve")

            started = time.monotonic()
            server.start()
            pid = server.pid
            wait_until(
                lambda: db.domain_state(DOMAIN) == "down",
                opts.timeout,
                f"{DOMAIN} marked down",
                server.running,
            )
            down_after = time.monotonic() - started
            progress(f"  primary marked down after {down_after:.1f} s; settling {opts.settle:g} s")
            settle_end = time.monotonic() + opts.settle
            while time.monotonic() < settle_end and server.running():  # bounded by --settle
                time.sleep(min(POLL_SECONDS, max(settle_end - time.monotonic(), 0)))
            pg_pids = db.backend_pids()

            before, pg_before = tree_cpu(server.pid), postgres_ticks(pg_pids)
            statuses_before = len(statuses())
            window_start = time.monotonic()
            window_end = window_start + opts.seconds
            next_scrape = window_start + opts.scrape if opts.scrape else math.inf
            scrapes = 0
            progress(f"  measuring {opts.seconds:g} s")
            while (now := time.monotonic()) < window_end:  # bounded by --seconds
                if not server.running():
                    raise ServerError(f"backupmx serve exited:\n{server.log_tail()}")
                if now >= next_scrape:
                    server.scrape()
                    scrapes += 1
                    next_scrape += opts.scrape
                time.sleep(min(POLL_SECONDS, window_end - now, max(next_scrape - now, 0)))
            after = tree_cpu(server.pid)
            window = time.monotonic() - window_start
            in_window = statuses()[statuses_before:]
            pg_after = postgres_ticks(db.backend_pids() if opts.postgres else [])
            rss = tree_rss_kib(pid)
            startup = sum(t for _, t in before.values()) / CLOCK_TICKS

            server.stop()
            states = db.recipient_states()
            result = Idle(
                backend=db.backend,
                held=held,
                fill_seconds=filled,
                down_after=down_after,
                startup_cpu=startup,
                window=window,
                cpu_seconds=cpu_spent(before, after),
                cpu_by_process=cpu_by_label(before, after),
                db_cpu_seconds=cpu_spent(pg_before, pg_after) if opts.postgres else None,
                rss_kib=rss,
                states_after=states,
                scrapes=scrapes,
                statuses=len(in_window),
                last_status=in_window[-1] if in_window else "",
            )
            progress(
                f"  CPU {result.cpu_percent:.2f} % of a core ("
                + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(result.cpu_by_process.items()))
                + f"), RSS {rss / KIB:.1f} MiB, after: {states}"
            )
            if opts.systemd:
                progress(f"  {result.statuses} STATUS= in the window, last: {result.last_status}")
            if result.problem:
                progress(f"  ! {result.problem}")
            return result
        except Exception:
            if server is not None:
                progress(server.log_tail(30))
            raise
        finally:
            cleanup(server.stop if server is not None else None, db.close)


# --------------------------------------------------------------------------- report


def report(results: Sequence[Idle], opts: argparse.Namespace, load_before: float) -> str:
    lines = [
        "",
        f"Idle cost with a large held queue (primary {PRIMARY_HOST}:{PRIMARY_PORT} down, "
        f"{RECIPIENTS_PER_MESSAGE} recipients per message)",
        "",
        f"cpu:        {cpu_model()}",
        f"kernel:     {platform.system()} {platform.release()}",
        f"python:     {platform.python_version()} ({opts.python} runs backupmx)",
        f"queue fs:   {filesystem_of(opts.workdir or tempfile.gettempdir())}"
        if not opts.postgres
        else f"queue:      PostgreSQL, database {POSTGRES_DATABASE}",
        f"window:     {opts.seconds:g} s after the primary was marked down + {opts.settle:g} s; "
        f"retry_min {opts.retry_min or 'default'}; "
        + (f"metrics scraped every {opts.scrape:g} s" if opts.scrape else "metrics not scraped")
        + ("; systemd STATUS= on" if opts.systemd else "")
        + (f"; {opts.domains} more backed-up domains, quiet" if opts.domains else ""),
        f"load avg:   {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (1 min)",
        "",
    ]
    header = (
        f"{'backend':<11}{'held rcpts':>11}{'fill s':>8}{'down after s':>13}"
        f"{'start-up CPU s':>15}{'CPU % of a core':>16}{'db CPU %':>9}{'RSS MiB':>9}"
        f"{'still queued':>13}"
    )
    lines += [header, "-" * len(header)]
    for r in results:
        db_cpu = "-" if r.db_cpu_percent is None else f"{r.db_cpu_percent:.2f}"
        lines.append(
            f"{r.backend:<11}{r.held:>11,}{r.fill_seconds:>8.1f}{r.down_after:>13.1f}"
            f"{r.startup_cpu:>15.1f}{r.cpu_percent:>16.2f}{db_cpu:>9}{r.rss_kib / KIB:>9.1f}"
            f"{r.still_queued:>12,}{'' if r.problem is None else '!'}"
        )
    lines.append(
        "CPU: serve + intake (utime+stime, /proc), over the window; db CPU: PostgreSQL "
        "backends of the server (SQLite's work is in the first figure)"
    )
    if any(r.problem for r in results):
        lines.append("! = not every held recipient is still queued; see stderr")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--recipients",
        metavar="N,..",
        help="held recipients, one run each (default 100000,1000000)",
    )
    parser.add_argument("--quick", action="store_true", help="1,000 and 100,000 held recipients")
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="measurement window (default %(default)g)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=15.0,
        help="wait after the primary is marked down, before measuring (default %(default)g)",
    )
    parser.add_argument(
        "--retry-min", metavar="DURATION", help='delivery.retry_min, e.g. "30s" (default: default)'
    )
    parser.add_argument(
        "--scrape",
        type=float,
        default=0.0,
        metavar="S",
        help="scrape /metrics every S seconds during the window, as Prometheus would (default off)",
    )
    parser.add_argument(
        "--domains",
        type=int,
        default=0,
        metavar="N",
        help="N more backed-up domains, with nothing pending and their primary up (default 0)",
    )
    parser.add_argument(
        "--systemd",
        action="store_true",
        help="give serve a NOTIFY_SOCKET, as systemd does, so that it sends STATUS= lines",
    )
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help=f"a PostgreSQL server to create the database {POSTGRES_DATABASE} on, e.g. "
        "postgresql://postgres@127.0.0.1:5432/postgres (default: SQLite)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="limit per wait, seconds (default %(default)g)"
    )
    parser.add_argument(
        "--workdir", help="where the temporary directory goes (default: system temp dir)"
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for backupmx")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write raw results as JSON")
    opts = parser.parse_args(argv)
    if opts.recipients:
        try:
            opts.held = tuple(int(n) for n in opts.recipients.split(","))
        except ValueError:
            parser.error("--recipients takes comma-separated integers")
    else:
        opts.held = QUICK_RECIPIENTS if opts.quick else RECIPIENTS
    if (
        any(n < 1 for n in opts.held)
        or opts.seconds <= 0
        or opts.settle < 0
        or opts.scrape < 0
        or opts.domains < 0
    ):
        parser.error(
            "--recipients and --seconds must be positive, --settle, --scrape and --domains >= 0"
        )
    if opts.postgres and make_url(opts.postgres).get_backend_name() != "postgresql":
        parser.error("--postgres takes a postgresql:// URL")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    check_primary_closed()
    load_before = os.getloadavg()[0]
    if load_before > 0.5 * len(os.sched_getaffinity(0)):
        progress(f"warning: load average is {load_before:.2f}; the figures will be noisy")
    if opts.seconds < PERIODIC_JOBS_SECONDS:
        progress(
            f"note: a window under {PERIODIC_JOBS_SECONDS} s may miss the periodic jobs "
            "(probes every 30 s, housekeeping every 60 s by default)"
        )
    results: list[Idle] = []
    with sigterm_as_exit():
        try:
            for held in opts.held:
                results.append(idle_run(held, opts))
        except (ServerError, subprocess.TimeoutExpired, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted; the server and its files are removed", file=sys.stderr)
            return 130
    print(report(results, opts, load_before))
    if opts.json is not None:
        opts.json.write_text(
            json.dumps(
                {
                    "cpu": cpu_model(),
                    "runs": [
                        asdict(r) | {"cpu_percent": r.cpu_percent, "problem": r.problem}
                        for r in results
                    ],
                },
                indent=2,
            )
        )
    return 1 if any(r.problem for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
