"""``backupmx domains`` and ``backupmx probe DOMAIN``: where held mail would go, and why it waits.

`domains` lists every configured domain and every domain with mail in the
queue: the route in use, the primary's state (up/down/unknown) and since when,
the last probe, queued and held counts, the age of the oldest message, and
which live nodes last reached the primary (each node keeps its own view).
``dns_failing`` is true while the domain is held because its own MX lookup
fails (NXDOMAIN, SERVFAIL, timeout): the reason then starts with ``DNS:``.
`probe` resolves a domain's route as the deliverer would (after self-pruning)
and tries an EHLO on each host, with timings; a host that answers marks the
domain up and makes its queued mail due, as a scheduled probe would.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from typing import Any

from backupmx.cli.output import age, json_text, table
from backupmx.cli.queue import open_store
from backupmx.cli.status import domain_lines, primary_reach
from backupmx.config import Config
from backupmx.mail.domains import normalize_domain
from backupmx.queue.domains import dns_failing
from backupmx.queue.state import PrimaryState


def add_parsers(verbs: Any) -> None:
    domains = verbs.add_parser("domains", help="each domain: route, primary state, held mail")
    domains.add_argument("--json", action="store_true")
    probe = verbs.add_parser("probe", help="resolve a domain's route and probe each host")
    probe.add_argument("domain")
    probe.add_argument("--json", action="store_true")


async def run_domains(args: argparse.Namespace, config: Config) -> int:
    store = await open_store(config.database)
    try:
        states = await store.domain_states()
        stats = await store.stats()
        views = await primary_reach(store, config)
    finally:
        await store.close()
    rows: list[dict[str, Any]] = []
    for line in domain_lines(config, states, stats, views, datetime.now(UTC)):
        state = states.get(line.name)
        rows.append(
            {
                **line.to_json(),
                "route": state.route if state else None,
                "reason": state.reason if state else None,
                "dns_failing": dns_failing(state) if state else False,
                "last_probe_at": state.to_json()["last_probe_at"] if state else None,
                "last_probe_result": state.last_probe_result if state else None,
            }
        )
    if args.json:
        print(json_text(rows))
        return 0
    if not rows:
        print("no domains configured and nothing queued")
        return 0
    print(
        table(
            [
                "DOMAIN",
                "PRIMARY",
                "SINCE",
                "QUEUED",
                "HELD",
                "OLDEST",
                "REACHED BY",
                "ROUTE / REASON",
            ],
            [
                [
                    r["domain"],
                    r["state"],
                    age(_parse(r["since"])) if r["since"] else "-",
                    str(r["queued"]),
                    str(r["held"]),
                    age(_parse(r["oldest_received_at"])) if r["oldest_received_at"] else "-",
                    ",".join(r["reached_by"]) or "-",
                    (r["reason"] or r["route"] or "")
                    if r["state"] != PrimaryState.UP
                    else (r["route"] or ""),
                ]
                for r in rows
            ],
        )
    )
    return 0


async def run_probe(args: argparse.Namespace, config: Config) -> int:
    # The delivery stack costs a third of a second to import; only `probe` needs it.
    from backupmx.app import App
    from backupmx.deliver.primaries import describe
    from backupmx.deliver.route import RoutePlan

    domain = normalize_domain(args.domain)
    store = await open_store(config.database)
    try:
        app = App(config, store)
        # The probe speaks for the node on this machine (the same name as its serve).
        membership = app.membership(lambda: None)
        membership.live = await store.live_nodes(timedelta(seconds=config.delivery.lease))
        route, tries = await app.primaries(membership).probe(domain)
    finally:
        await store.close()
    up = any(result.startswith("ok") for _, result, _ in tries)
    if args.json:
        print(
            json_text(
                {
                    "domain": domain,
                    "route": describe(route),
                    "hosts": [
                        {"host": str(t), "result": r, "seconds": round(s, 3)} for t, r, s in tries
                    ],
                    "up": up,
                }
            )
        )
    else:
        kind = route.source if isinstance(route, RoutePlan) else "no route"
        print(f"{domain}: {kind}: {describe(route)}")
        for where, result, seconds in tries:
            print(f"  {where}  {seconds * 1000:.0f} ms  {result}")
        print(f"primary {PrimaryState.UP if up else PrimaryState.DOWN}")
    return 0 if up else 1


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
