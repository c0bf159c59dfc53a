"""``backupmx status``: one screen for the person on call.

Whether the server answers (its ``/healthz`` on ``[metrics] listen``), where it
listens, which database it uses, the disk it takes and what is free beside it (for
SQLite: a PostgreSQL server's disk is watched where that server runs), the
queue's totals by state, the nodes sharing the queue (live or dead, heartbeat,
recipients in flight, delivery rate), each domain's primary (up or down, since when), its
oldest message and its next probe, and a bar chart of how long the pending
messages have waited (qshape's question: "is this a burst, or has it been piling
up for days?").

Everything comes from the configuration and the queue database, so the command
works on any node sharing the queue and while the server is stopped; ``--json``
gives the same facts to scripts.  Exit status 1 only when the database cannot be
read (a server that does not answer is a fact to show, not a failure of the command).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from backupmx.cli import nodes as node_listing
from backupmx.cli.queue import _age, _json, open_store, table
from backupmx.config import Config
from backupmx.mail.domains import DomainNames, normalize_domain
from backupmx.mail.hosts import parse_host_port
from backupmx.queue.database import current_revision, safe_url
from backupmx.queue.records import DomainState, Stats, waiting
from backupmx.queue.state import PrimaryState
from backupmx.queue.store import Store

HEALTH_TIMEOUT = 2.0  # seconds to wait for the server's /healthz before calling it silent
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
    status = verbs.add_parser("status", help="one screen: server, queue, primaries, queue age")
    status.add_argument("--json", action="store_true")


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


def server_health(listen: str) -> dict[str, Any] | None:
    """The running server's /healthz body (200 or 503), or None if nothing answers."""
    if not listen:
        return None
    address = parse_host_port(listen)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{address.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT) as response:
            body = response.read()
    except urllib.error.HTTPError as error:  # 503: it answers, and says what is wrong
        body = error.read()
    except (OSError, ValueError):
        return None
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


async def run(args: argparse.Namespace, config: Config) -> int:
    now = datetime.now(UTC)
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
    facts = {
        "hostname": config.hostname,
        "server": server_health(config.metrics.listen),
        "listen": list(config.listen),
        "metrics": config.metrics.listen or None,
        "database": safe_url(config.database),
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
    print(_json(facts) if args.json else render(facts, now))
    return 0


def render(facts: dict[str, Any], now: datetime) -> str:
    queue = facts["queue"]
    totals = queue["recipients"]
    oldest = _parse(queue["oldest_received_at"])
    lines = [
        f"backupmx on {facts['hostname']}, {_stamp(now)}",
        f"server     {_describe_server(facts['server'], facts['metrics'])}",
        f"listen     {', '.join(facts['listen'])}",
        f"database   {facts['database']} (schema {facts['schema_revision'] or 'none'})",
        f"disk       {space_line(facts['database_bytes'], facts['filesystem_free_bytes'])}",
        f"queue      {queue['messages']} message(s); recipients: "
        + ", ".join(f"{state} {count}" for state, count in totals.items()),
        "oldest     " + (f"{_stamp(oldest)} ({_age(oldest, now)} ago)" if oldest else "-"),
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


def _describe_server(health: dict[str, Any] | None, metrics: str | None) -> str:
    if metrics is None:
        return "unknown ([metrics] listen is off)"
    if health is None:
        return f"not answering on {metrics} (stopped?)"
    uptime = timedelta(seconds=health.get("process", {}).get("uptime_seconds", 0))
    pid = health.get("process", {}).get("pid", "?")
    if health.get("status") == "ok":
        return f"running, healthy (pid {pid}, up {_age(datetime.now(UTC) - uptime)})"
    problems = []
    store = health.get("store", {})
    if not store.get("reachable", True):
        problems.append(f"database unreachable: {store.get('error')}")
    if not health.get("listener", {}).get("bound", True):
        problems.append("listener not accepting (draining?)")
    return f"running, UNHEALTHY (pid {pid}): " + "; ".join(problems or ["see /healthz"])


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
    return _age(when, now) if when else "-"


def _until(text: str | None, now: datetime) -> str:
    when = _parse(text)
    if when is None:
        return "-"
    seconds = int((when - now).total_seconds())
    return "due" if seconds <= 0 else f"in {_age(now - timedelta(seconds=seconds), now)}"
