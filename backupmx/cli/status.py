"""``backupmx status``: one screen for the person on call, and a health check.

First one line per problem (the server not answering, not accepting mail, fenced,
its database unreachable; a backed-up domain's primary down), then whether the
server answers on its control socket (`backupmx.control`) and who it is, where it
listens, which database it uses, the disk it takes and what is free beside it (for
SQLite: a PostgreSQL server's disk is watched where that server runs), the
queue's totals by state, the nodes sharing the queue (live or dead, heartbeat,
recipients in flight, delivery rate), each domain's primary (up or down, since when), its
oldest message and its next probe, and a bar chart of how long the pending
messages have waited (qshape's question: "is this a burst, or has it been piling
up for days?").

Besides the server's own answer, everything comes from the configuration and the
queue database, so the command shows the queue while the server is stopped;
``--json`` gives the same facts to monitors.  Exit status 0 only when the server
answers and reports no error (it accepts mail, its heartbeat holds, its database
answers) and the database can be read here; 1 otherwise.  A primary that is down is
a warning, not a failure: holding its mail is what a backup MX is for.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.exc import SQLAlchemyError

from backupmx import control
from backupmx.cli import CommandError
from backupmx.cli import nodes as node_listing
from backupmx.cli.output import age, json_text, table
from backupmx.cli.queue import open_store
from backupmx.config import Config, Domain
from backupmx.mail.domains import DomainNames, normalize_domain
from backupmx.queue.database import current_revision, safe_url
from backupmx.queue.records import DomainState, Stats, waiting
from backupmx.queue.state import PrimaryState
from backupmx.queue.store import Store

BAR_WIDTH = 40
# Queue age buckets: upper bounds in seconds (the last one is open-ended).  The
# steps follow what an operator acts on: a burst (minutes), an outage (hours), the
# delay warning (a day) and expiry (Postfix's 5 days).
AGE_BUCKETS: tuple[tuple[str, float], ...] = (
    ("< 5m", 300),
    ("5m-1h", 3600),
    ("1h-4h", 4 * 3600),
    ("4h-1d", 86400),
    ("1d-5d", 5 * 86400),
    ("> 5d", float("inf")),
)


def add_parser(verbs: Any) -> None:
    status = verbs.add_parser(
        "status", help="health check and one screen: server, queue, primaries, queue age"
    )
    status.add_argument("--json", action="store_true")


@dataclass(frozen=True)
class Problem:
    """One line at the top of `status`: an error fails the health check, a warning does not."""

    kind: str  # server_not_running, node_fenced, primary_down…: for monitors to match on
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{self.severity}: {self.message}"

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "severity": self.severity, "message": self.message}


def server_problems(
    path: Path, server: dict[str, Any] | None, silence: control.NoAnswer | None
) -> list[Problem]:
    """What is wrong with the server, from its answer on the control socket (or its silence)."""
    if server is None:
        if silence is not None and silence.running is None:
            reason = silence.reason
            return [Problem("server_not_answering", f"server not answering ({path}: {reason})")]
        text = f"server not running (no answer on control socket {path})"
        return [Problem("server_not_running", text)]
    found = []
    if server.get("state") == "starting":
        found.append(Problem("server_starting", "server starting: not accepting mail yet"))
    elif not server.get("accepting"):
        found.append(Problem("server_stopping", "server stopping: not accepting mail"))
    store = server.get("store") or {"reachable": True}
    if not store.get("reachable"):
        message = f"database unreachable from the server: {store.get('error')}"
        found.append(Problem("server_database_unreachable", message))
    if server.get("fence_up") is False:
        message = (
            f"node {server.get('node')} fenced: its heartbeat is late, it sends nothing"
            " until one is written (database slow or unreachable?)"
        )
        found.append(Problem("node_fenced", message))
    return found


def queue_problems(
    domains: Sequence[dict[str, Any]] | None, unreadable: str | None, now: datetime
) -> list[Problem]:
    """What the queue database says is wrong: itself unreadable, or primaries down."""
    if unreadable is not None:
        return [Problem("database_unreachable", unreadable)]
    found = []
    for d in domains or []:
        if d["backed_up"] and d["state"] == PrimaryState.DOWN:
            since = f" for {_ago(d['since'], now)}" if d["since"] else ""
            message = (
                f"primary of {d['domain']} down{since}: "
                f"{d['queued']} recipient(s) waiting, {d['held']} held"
            )
            found.append(Problem("primary_down", message, "warning"))
    return found


@dataclass(frozen=True)
class DomainLine:
    name: str
    backed_up: bool
    state: PrimaryState
    since: datetime | None
    queued: int  # queued or being sent
    held: int
    oldest: datetime | None
    next_probe: datetime | None  # probes run only for domains with mail waiting
    reached_by: tuple[str, ...]  # the live nodes that last saw the primary up

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.name,
            "backed_up": self.backed_up,
            "state": self.state,
            "since": _iso(self.since),
            "queued": self.queued,
            "held": self.held,
            "oldest_received_at": _iso(self.oldest),
            "next_probe_at": _iso(self.next_probe),
            "reached_by": list(self.reached_by),
        }


async def primary_reach(store: Store, config: Config) -> dict[str, dict[str, PrimaryState]]:
    """Each domain's primary as each live node last saw it (`domain_lines`' `views`)."""
    live = await store.live_nodes(timedelta(seconds=config.delivery.lease))
    return await store.primary_views(live)


def domain_lines(
    config: Config,
    states: dict[str, DomainState],
    stats: Stats,
    views: dict[str, dict[str, PrimaryState]],
    now: datetime,
) -> list[DomainLine]:
    """Every domain backed up by its exact name, and every domain with mail in the queue
    (a ``.parent`` entry shows through the subdomains that have mail); `views` are the
    live nodes' own views of each primary (`primary_reach`)."""
    backed_up = DomainNames((d.name, d) for d in config.domain)
    exact = {normalize_domain(d.name) for d in config.domain if not d.name.startswith(".")}
    queued = {d.domain: d for d in stats.domains}
    lines = []
    for name in sorted(exact | set(queued)):
        state = states.get(name)
        counts = queued[name].counts if name in queued else {}
        next_probe = None
        if waiting(counts):
            last = state.last_probe_at if state else None
            interval = timedelta(seconds=config.delivery.probe_interval)
            next_probe = max(last + interval, now) if last else now
        lines.append(
            DomainLine(
                name=name,
                backed_up=backed_up.covers(name),
                state=state.state if state else PrimaryState.UNKNOWN,
                since=state.since if state else None,
                queued=waiting(counts),
                held=counts.get("held", 0),
                oldest=queued[name].oldest if name in queued else None,
                next_probe=next_probe,
                reached_by=tuple(
                    sorted(n for n, seen in views.get(name, {}).items() if seen is PrimaryState.UP)
                ),
            )
        )
    return lines


def bar_chart(rows: Sequence[tuple[str, int]], mark: str = "#") -> str:
    """A horizontal bar per row, scaled to the largest; a non-zero count shows at least one mark."""
    largest = max((count for _, count in rows), default=0)
    label_width = max((len(label) for label, _ in rows), default=0)
    lines = []
    for label, count in rows:
        length = 0 if not largest else max(round(BAR_WIDTH * count / largest), 1 if count else 0)
        lines.append(f"  {label.ljust(label_width)}  {(mark * length).ljust(BAR_WIDTH)}  {count}")
    return "\n".join(lines)


def space_line(used: int, free: int | None) -> str:
    """The disk line: what the queue takes, and what is free beside it when we can see it."""
    text = f"{_size(used)} used by the queue"
    return text + (f", {_size(free)} free beside it" if free is not None else "")


def _size(count: int) -> str:
    """Bytes for people, in powers of 1024: 512 B, 1.5 MiB, 20.0 GiB."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


# The facts read from the queue database: null in --json when it cannot be read.
QUEUE_FACTS = ("schema_revision", "database_bytes", "filesystem_free_bytes", "queue", "nodes",
               "domains", "age_histogram")  # fmt: skip


async def queue_facts(config: Config, now: datetime) -> dict[str, Any]:
    store = await open_store(config.database)
    try:
        revision = await current_revision(store.engine)
        stats = await store.stats()
        states = await store.domain_states()
        bounds = [timedelta(seconds=upper) for _, upper in AGE_BUCKETS[:-1]]
        ages = await store.pending_ages(bounds, now)
        footprint = await store.footprint()
        nodes = await node_listing.node_facts(store, config)
        views = await primary_reach(store, config)
    finally:
        await store.close()
    return {
        "schema_revision": revision,
        "database_bytes": footprint.database_bytes,
        "filesystem_free_bytes": footprint.free_bytes,
        "queue": stats.to_json(),
        "nodes": nodes,
        "domains": [line.to_json() for line in domain_lines(config, states, stats, views, now)],
        "age_histogram": [
            {"age": label, "messages": count}
            for (label, _), count in zip(AGE_BUCKETS, ages, strict=True)
        ],
    }


async def run(args: argparse.Namespace, config: Config) -> int:
    now = datetime.now(UTC)
    path = control.socket_path(config)
    silence = None
    try:
        server: dict[str, Any] | None = await control.ask(path)
    except control.NoAnswer as error:
        server, silence = None, error
    if server is not None:
        config = as_served(config, server)
    facts: dict[str, Any] = {
        "control_socket": str(path),
        "server": server,
        "hostname": config.hostname,
        "listen": list(config.listen),
        "metrics": config.metrics.listen or None,
        "database": safe_url(config.database),
        **dict.fromkeys(QUEUE_FACTS),
    }
    unreadable = None
    try:
        facts.update(await queue_facts(config, now))
    except CommandError as error:  # unreachable, missing, schema too old
        unreadable = str(error)
    except SQLAlchemyError as error:
        unreadable = f"database error: {getattr(error, 'orig', None) or error}"
    problems = server_problems(path, server, silence)
    problems += queue_problems(facts["domains"], unreadable, now)
    ok = not any(p.severity == "error" for p in problems)
    facts = {"ok": ok, "problems": [p.to_json() for p in problems], **facts}
    print(json_text(facts) if args.json else render(facts, now))
    return 0 if ok else 1


def as_served(config: Config, server: dict[str, Any]) -> Config:
    """The server's own name, listen addresses and domains, which its command line
    (`serve --primary`, `--listen`) may have set apart from the file."""
    listen, domains = server.get("listen"), server.get("domains")
    if not isinstance(listen, list) or not isinstance(domains, list):
        return config
    configured = {d.name: d for d in config.domain}
    return dataclasses.replace(
        config,
        hostname=str(server.get("hostname") or config.hostname),
        listen=tuple(str(a) for a in listen),
        domain=tuple(configured.get(str(name), Domain(name=str(name))) for name in domains),
    )


def render(facts: dict[str, Any], now: datetime) -> str:
    lines = [f"{p['severity']}: {p['message']}" for p in facts["problems"]]
    lines += [""] if lines else []
    lines += [
        f"backupmx on {facts['hostname']}, {_stamp(now)}",
        f"server     {_describe_server(facts['server'], facts['ok'], now)}",
        f"listen     {', '.join(facts['listen'])}",
    ]
    queue = facts["queue"]
    if queue is None:
        lines.append(f"database   {facts['database']} (cannot be read)")
        return "\n".join(lines)
    totals = queue["recipients"]
    oldest = _parse(queue["oldest_received_at"])
    lines += [
        f"database   {facts['database']} (schema {facts['schema_revision'] or 'none'})",
        f"disk       {space_line(facts['database_bytes'], facts['filesystem_free_bytes'])}",
        f"queue      {queue['messages']} message(s); recipients: "
        + ", ".join(f"{state} {count}" for state, count in totals.items()),
        "oldest     " + (f"{_stamp(oldest)} ({age(oldest, now)} ago)" if oldest else "-"),
        f"nodes      {node_listing.summary(facts['nodes'])}",
        "",
    ]
    if facts["nodes"]:
        lines += [node_listing.render(facts["nodes"], now, brief=True), ""]
    rows = [
        [
            d["domain"] + ("" if d["backed_up"] else " *"),
            d["state"],
            _ago(d["since"], now),
            str(d["queued"]),
            str(d["held"]),
            _ago(d["oldest_received_at"], now),
            _until(d["next_probe_at"], now),
        ]
        for d in facts["domains"]
    ]
    if rows:
        lines.append(
            table(["DOMAIN", "PRIMARY", "SINCE", "QUEUED", "HELD", "OLDEST", "NEXT PROBE"], rows)
        )
        if any(not d["backed_up"] for d in facts["domains"]):
            lines.append("  * not backed up here: bounces (DSNs) on their way to senders")
    else:
        lines.append("no domains configured and nothing queued")
    histogram = [(h["age"], h["messages"]) for h in facts["age_histogram"]]
    lines += ["", "QUEUE AGE (messages with a recipient pending)", bar_chart(histogram, _mark())]
    return "\n".join(lines)


def _describe_server(server: dict[str, Any] | None, ok: bool, now: datetime) -> str:
    """The server line; what is wrong is in the problem lines above it."""
    if server is None:
        return "not answering (see above)"
    uptime = now - timedelta(seconds=server.get("uptime_seconds", 0))
    health = "healthy" if ok else "UNHEALTHY"
    return (
        f"running, {health} (pid {server.get('pid', '?')}, up {age(uptime, now)}); "
        f"version {server.get('version')}, node {server.get('node')}"
    )


def _mark() -> str:
    encoding = (sys.stdout.encoding or "").lower().replace("-", "")
    return "█" if encoding == "utf8" else "#"


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


def _stamp(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def _ago(text: str | None, now: datetime) -> str:
    when = _parse(text)
    return age(when, now) if when else "-"


def _until(text: str | None, now: datetime) -> str:
    when = _parse(text)
    if when is None:
        return "-"
    seconds = int((when - now).total_seconds())
    return "due" if seconds <= 0 else f"in {age(now - timedelta(seconds=seconds), now)}"
