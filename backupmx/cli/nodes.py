"""``backupmx nodes``: the ``serve`` processes sharing this queue, and what each is doing.

Every ``serve`` writes its row in ``nodes`` at each heartbeat (every sixth of
``[delivery] lease``).  A node is *live* while its last heartbeat is younger than
the lease, *stopped* after a clean stop, and *dead* otherwise: it crashed or lost
the database, and a live node gives its recipients back to the queue.  The
recipients a node has in flight are counted in the queue (the ``sending`` rows it
owns), beside what the node itself reported.

Read from the queue database alone, so it works on any node and while every
server is stopped; ``status`` shows the same nodes, one short line each, and
``--json`` gives the facts to scripts.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from backupmx.cli.output import json_text, span, table
from backupmx.cli.queue import open_store
from backupmx.config import Config
from backupmx.queue.records import NodeState
from backupmx.queue.store import Store

# `render`'s columns; `status` shows the first five.
COLUMNS = ["NODE", "STATE", "HEARTBEAT", "IN FLIGHT", "RATE", "REPORTED", "DELIVERED",
           "STARTED", "PID", "VERSION", "HOSTNAME", "LISTEN"]  # fmt: skip
BRIEF = 5


def add_parser(verbs: Any) -> None:
    nodes = verbs.add_parser("nodes", help="the serve processes sharing this queue")
    nodes.add_argument("--json", action="store_true")


async def node_facts(store: Store, config: Config) -> list[dict[str, Any]]:
    """Every node, as ``nodes --json`` gives it: live if heard from within the lease."""
    return [node.to_json() for node in await store.nodes(timedelta(seconds=config.delivery.lease))]


async def run(args: argparse.Namespace, config: Config) -> int:
    store = await open_store(config.database)
    try:
        found = await node_facts(store, config)
    finally:
        await store.close()
    print(json_text(found) if args.json else render(found, datetime.now(UTC)))
    return 0


def summary(nodes: Sequence[dict[str, Any]]) -> str:
    """ "2 live, 1 dead", or "none" before any node has written a heartbeat."""
    counts = Counter(node["state"] for node in nodes)
    return ", ".join(f"{counts[s]} {s}" for s in NodeState if counts[s]) or "none"


def render(nodes: Sequence[dict[str, Any]], now: datetime, brief: bool = False) -> str:
    """A table of `node_facts`; `brief`: name, state, heartbeat, in flight and rate."""
    if not nodes:
        return "no node has written a heartbeat to this queue"
    rows = [
        [
            n["name"],
            n["state"],
            span(n["heartbeat_age_seconds"]),
            str(n["in_flight"]),
            f"{n['delivery_rate']:.1f}/s",
            str(n["reported_in_flight"]),
            str(n["delivered"]),
            span((now - datetime.fromisoformat(n["started_at"])).total_seconds()),
            str(n["pid"]),
            n["version"],
            n["hostname"],
            ", ".join(n["listen"]),
        ]
        for n in nodes
    ]
    width = BRIEF if brief else len(COLUMNS)
    return table(COLUMNS[:width], [row[:width] for row in rows])
