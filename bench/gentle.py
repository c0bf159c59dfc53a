"""How gently a backup MX drains its queue into a primary that limits its sessions.

What is measured
    N held messages (default 2,000, 10 KiB) for ``example.test`` are injected with
    Postfix's ``smtp-source`` while the primary is down, so every one of them is
    held.  Then the primary starts: an asyncio SMTP server (`LimitedPrimary`, in
    tests/support/limited_primary.py, shared with the pacing tests) that takes at
    most 4 concurrent sessions, answers ``421 4.7.0 Too busy`` at connect to any
    beyond them, and takes 50 ms per message (after the final dot, before its
    ``250``).  It records every refusal, the peak of concurrent sessions and the
    time of each message.  The clock runs from the primary's start until its last
    message (the server's queue empty):

    * refusals: ``421`` greetings the primary sent (target: at most 10);
    * peak sessions: concurrent sessions the primary held (at most its limit);
    * transitions: changes of the domain's primary state after the primary
      started (backupmx: its ``primary_up`` and ``primary_down`` log events;
      target: at most 2);
    * drain s, and its ratio to the ideal ``N × 50 ms / sessions`` (target: at
      most 1.2 with the rate cap off).

    backupmx runs with its default pacing (``initial_connections_per_host = 2``,
    ``max_connections_per_host = 20``), ``probe_interval = "1s"`` so that it finds
    the primary within a second on its own, twice: with the rate cap off
    (``max_messages_per_second_per_host = 0``: the target row), and with the
    default cap of 50 msg/s, which alone makes a drain of 2,000 messages take 40 s.
    Postfix (``postfix_backup.py``) runs with its defaults, relaying to the
    primary, ``postqueue -f`` right after the primary starts; its drain is bounded
    by ``--postfix-limit`` (120 s), and what it delivered by then is reported.
    Postfix has no domain state; its column shows how many deliveries it deferred
    as "delivery temporarily suspended" (its dead-destination state).

Run (as root, Postfix needs it) from the repository root::

    .venv/bin/python bench/gentle.py                      # both, one run each
    .venv/bin/python bench/gentle.py --runs 3 --only backupmx   # medians of 3
    .venv/bin/python bench/gentle.py --only postfix

Every phase is bounded by ``--timeout`` seconds; servers, the primary and the
temporary directories are removed on exit, also on error or Ctrl-C.  Only
loopback addresses are used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from accept import KIB, REPO_ROOT, BackupMXServer, free_port, run_smtp_source, sigterm_as_exit
from flush import PENDING_SQL, PostfixHolding
from postfix_backup import ServerError

sys.path.insert(0, str(REPO_ROOT))
from tests.support.limited_primary import LimitedPrimary  # shared with the pacing tests

MESSAGES: Final = 2_000
MESSAGE_SIZE: Final = 10 * KIB
INJECT_SESSIONS: Final = 20
PRIMARY_SESSIONS: Final = 4
PER_MESSAGE: Final = 0.05  # seconds the primary takes per message
DEFAULT_RATE_CAP: Final = 50  # delivery.max_messages_per_second_per_host's default

BACKUPMX_CONF: Final = """\
hostname = "mx2.bench.test"
listen = ["127.0.0.1:{port}"]
database = "sqlite:///{db}"

[limits]
max_connections = 200
max_connections_per_ip = 200

[metrics]
listen = ""

[delivery]
probe_interval = "1s"
max_messages_per_second_per_host = {rate}

[[domain]]
name = "example.test"
primary = ["127.0.0.1:{primary_port}"]
"""

# --------------------------------------------------------------------------- the servers


class BackupMXGentle(BackupMXServer):
    """backupmx routing example.test to the limited primary, default pacing."""

    def __init__(
        self, workdir: Path, port: int, primary_port: int, rate: int, python: str, timeout: float
    ) -> None:
        super().__init__(workdir, port, python=python, timeout=timeout)
        self.primary_port = primary_port
        self.rate = rate
        self.db = workdir / "queue.db"

    def write_config(self) -> None:
        self.conf.write_text(
            BACKUPMX_CONF.format(
                port=self.port, db=self.db, rate=self.rate, primary_port=self.primary_port
            )
        )

    def _scalar(self, sql: str) -> int:
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10) as db:
            return int(db.execute(sql).fetchone()[0])

    def pending(self) -> int:
        return self._scalar(PENDING_SQL)

    def held(self) -> bool:
        """The primary known to be down."""
        return self._scalar("SELECT count(*) FROM domains WHERE state = 'down'") == 1

    def log_size(self) -> int:
        return self.log.stat().st_size

    def events(self, since: int) -> list[dict[str, object]]:
        """The JSON log events written after byte `since`."""
        with self.log.open("rb") as log:
            log.seek(since)
            lines = log.read().splitlines()
        events = []
        for line in lines:
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def flush(self) -> None:
        """Nothing to do: the next probe (within a second) finds the primary back."""


class PostfixGentle(PostfixHolding):
    """The private Postfix, defaults otherwise, relaying to the limited primary."""

    def log_size(self) -> int:
        return self.maillog.stat().st_size if self.maillog.exists() else 0

    def suspended(self, since: int) -> int:
        """Deliveries deferred, after byte `since` of the log, because the destination
        was marked dead."""
        with self.maillog.open("rb") as log:
            log.seek(since)
            return log.read().count(b"delivery temporarily suspended")


# --------------------------------------------------------------------------- a drain


@dataclass(frozen=True)
class Drain:
    server: str
    setting: str
    messages: int
    delivered: int  # messages the primary took (duplicates included)
    drain_seconds: float  # primary started -> queue empty (or the bound)
    finished: bool  # the queue emptied within the bound
    refusals: int
    peak: int
    sessions: int
    transitions: int | None  # backupmx: primary_up/primary_down events; postfix: None
    suspended: int | None  # postfix: "delivery temporarily suspended" deferrals

    @property
    def ideal(self) -> float:
        return self.messages * PER_MESSAGE / PRIMARY_SESSIONS

    @property
    def ratio(self) -> float:
        return self.drain_seconds / self.ideal


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise ServerError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
    return True


def drain_run(name: str, rate: int, opts: argparse.Namespace) -> Drain:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-gentle-{name}-"))
    port, primary_port = free_port(), free_port()
    server: BackupMXGentle | PostfixGentle
    if name == "backupmx":
        server = BackupMXGentle(workdir, port, primary_port, rate, opts.python, opts.timeout)
        setting = f"rate cap {rate} msg/s" if rate else "no rate cap"
        bound = opts.timeout
    else:
        server = PostfixGentle(workdir, port, primary=f"[127.0.0.1]:{primary_port}")
        setting = "defaults"
        bound = opts.postfix_limit
    primary = LimitedPrimary("127.0.0.1", primary_port, PRIMARY_SESSIONS, PER_MESSAGE)
    try:
        progress(f"{name} ({setting}): injecting {opts.messages} messages, primary down")
        server.start()
        load = run_smtp_source(
            port,
            sessions=INJECT_SESSIONS,
            messages=opts.messages,
            size=MESSAGE_SIZE,
            timeout=opts.timeout,
            reuse=True,
        )
        if load.returncode != 0:
            raise ServerError(f"smtp-source failed: {load.stderr[-300:]}")
        wait_until(lambda: server.pending() == opts.messages, opts.timeout, "all held", 0.2)
        wait_until(server.held, opts.timeout, "the primary known down", 0.2)
        log_from = server.log_size()

        progress(f"{name} ({setting}): primary back, draining (bound {bound:.0f} s)")
        started = primary.start()
        server.flush()
        deadline = started + bound
        while server.pending() > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        finished = server.pending() == 0
        drained = time.monotonic() - started
        seen = primary.snapshot()
        if finished and seen.messages:
            drained = max(seen.messages) - started
        transitions = suspended = None
        if isinstance(server, BackupMXGentle):
            events = server.events(log_from)
            transitions = sum(e.get("event") in ("primary_up", "primary_down") for e in events)
        else:
            suspended = server.suspended(log_from)
        refused_at = ", ".join(f"{t - started:.1f}" for t in seen.refusals[:12])
        progress(f"  refusals at (s): {refused_at}{' …' if len(seen.refusals) > 12 else ''}")
        return Drain(
            name,
            setting,
            opts.messages,
            len(seen.messages),
            drained,
            finished,
            len(seen.refusals),
            seen.peak,
            seen.sessions,
            transitions,
            suspended,
        )
    except BaseException:
        progress(server.log_tail())
        raise
    finally:
        server.stop()
        primary.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def median_drain(drains: Sequence[Drain]) -> Drain:
    """Each figure's median over the runs (so a row may mix runs)."""
    first = drains[0]

    def med(values: Sequence[float]) -> float:
        return float(statistics.median(values))

    def med_or_none(values: Sequence[int | None]) -> int | None:
        present = [v for v in values if v is not None]
        return round(med(present)) if present else None

    return Drain(
        first.server,
        first.setting,
        first.messages,
        round(med([d.delivered for d in drains])),
        med([d.drain_seconds for d in drains]),
        all(d.finished for d in drains),
        round(med([d.refusals for d in drains])),
        round(med([d.peak for d in drains])),
        round(med([d.sessions for d in drains])),
        med_or_none([d.transitions for d in drains]),
        med_or_none([d.suspended for d in drains]),
    )


# --------------------------------------------------------------------------- report


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def report(rows: Sequence[Drain], runs: int, load: str) -> str:
    ideal = rows[0].ideal if rows else 0.0
    lines = [
        f"drain of {rows[0].messages if rows else 0} held {MESSAGE_SIZE // KIB} KiB messages "
        f"into a primary of {PRIMARY_SESSIONS} sessions (421 beyond), "
        f"{PER_MESSAGE * 1000:.0f} ms per message; ideal {ideal:.1f} s",
        f"backupmx: medians of {runs} run(s); postfix: one run; load average before: {load}",
        f"{'server':<10}{'setting':<22}{'delivered':>10}{'drain s':>10}{'× ideal':>9}"
        f"{'refusals':>10}{'peak':>6}{'sessions':>10}{'flips':>7}",
    ]
    for d in rows:
        drain = f"{d.drain_seconds:.1f}" if d.finished else f">{d.drain_seconds:.0f}"
        ratio = f"{d.ratio:.2f}" if d.finished else f">{d.ratio:.1f}"
        flips = "-" if d.transitions is None else str(d.transitions)
        lines.append(
            f"{d.server:<10}{d.setting:<22}{d.delivered:>10}{drain:>10}{ratio:>9}"
            f"{d.refusals:>10}{d.peak:>6}{d.sessions:>10}{flips:>7}"
        )
        if d.suspended is not None:
            lines.append(
                f"{'':<10}postfix deferred {d.suspended} deliveries as "
                '"delivery temporarily suspended" (its dead-destination state) '
                "after the primary started"
            )
        if d.server == "backupmx" and d.setting.startswith("rate cap"):
            lines.append(
                f"{'':<10}the default rate cap alone takes {d.messages / DEFAULT_RATE_CAP:.0f} s "
                "for these messages"
            )
    lines.append(
        "targets (no rate cap): refusals <= 10, flips <= 2, drain <= 1.2 x ideal "
        f"({1.2 * ideal:.0f} s)"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=MESSAGES, help="held messages")
    parser.add_argument("--runs", type=int, default=1, help="runs per backupmx row (medians)")
    parser.add_argument(
        "--only", choices=("backupmx", "postfix"), action="append", help="repeatable"
    )
    parser.add_argument(
        "--no-default-cap", action="store_true", help="skip backupmx's default-rate-cap row"
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="limit per phase, seconds")
    parser.add_argument(
        "--postfix-limit", type=float, default=120.0, help="bound of Postfix's drain, seconds"
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for backupmx")
    opts = parser.parse_args(argv)
    opts.only = opts.only or ["backupmx", "postfix"]
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if shutil.which("smtp-source") is None:
        raise SystemExit("smtp-source is needed (Debian package: postfix)")
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    rows: list[Drain] = []
    with sigterm_as_exit():
        try:
            if "backupmx" in opts.only:
                rates = [0] if opts.no_default_cap else [0, DEFAULT_RATE_CAP]
                for rate in rates:
                    runs = [drain_run("backupmx", rate, opts) for _ in range(opts.runs)]
                    rows.append(median_drain(runs))
            if "postfix" in opts.only:
                rows.append(drain_run("postfix", 0, opts))
        except ServerError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    print(report(rows, opts.runs, load))
    return 0


if __name__ == "__main__":
    sys.exit(main())
