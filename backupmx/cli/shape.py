"""``backupmx queue shape``: pending mail as a matrix of domains by age, as Postfix's qshape.

Rows are the recipient domains (each pending recipient counts once), or with
``--sender`` the senders' domains (each message with a pending recipient counts
once); TOTAL comes first, then the domains, largest first.  Columns are ``T``
(the total) and qshape's default age buckets, in minutes since the message was
received: younger than 5, then 5 to 10, 10 to 20, … 640 to 1280, and older
(``1280+``).  ``--parent`` adds a row per parent domain, ``.example.org`` (the
domain and everything under it), for each parent with at least
``--min-subdomains`` subdomains with pending mail; top-level domains get none
(qshape's ``-p`` and ``-m``).

The counting is the database's (`backupmx.queue.shape`: one grouped query), so
the command's memory grows with the number of domains, not of messages.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from backupmx.cli.output import json_text, printable
from backupmx.queue.records import ShapeRow
from backupmx.queue.store import Store

BUCKET_MINUTES = (5, 10, 20, 40, 80, 160, 320, 640, 1280)  # qshape's: -t 5 -b 10
MIN_SUBDOMAINS = 5  # qshape's -m default


def add_parser(verbs: Any) -> None:
    text = "pending mail by domain and age, as Postfix's qshape"
    shape = verbs.add_parser("shape", help=text, description=text)
    shape.add_argument(
        "--sender", action="store_true", help="by sender domain (messages), not recipient domain"
    )
    shape.add_argument(
        "--parent",
        action="store_true",
        help="add parent domains (.example.org: it and its subdomains), as qshape -p",
    )
    shape.add_argument(
        "--min-subdomains",
        type=int,
        default=MIN_SUBDOMAINS,
        metavar="N",
        help=f"with --parent: subdomains a parent needs for a row (default {MIN_SUBDOMAINS})",
    )
    shape.add_argument("--json", action="store_true")


async def run(store: Store, args: argparse.Namespace) -> int:
    rows = await store.shape(BUCKET_MINUTES, by_sender=args.sender)
    total = ShapeRow("TOTAL", _sum(rows))
    if args.parent:
        rows = rows + parents(rows, args.min_subdomains)
    rows = sorted(rows, key=lambda r: (-r.total, r.domain))
    if args.json:
        document = {
            "counts": "messages" if args.sender else "recipients",
            "bucket_minutes": list(BUCKET_MINUTES),
            "total": {"total": total.total, "buckets": list(total.buckets)},
            "domains": [r.to_json() for r in rows],
        }
        print(json_text(document))
    else:
        print(render(total, rows))
    return 0


def parents(rows: Sequence[ShapeRow], min_subdomains: int) -> list[ShapeRow]:
    """A row ``.parent`` for each parent domain (not a top-level one) of the rows' domains
    with at least `min_subdomains` subdomains among them: its own mail and theirs."""
    below: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        labels = row.domain.split(".")
        for cut in range(1, len(labels) - 1):
            below[".".join(labels[cut:])].add(row.domain)
    counted = {r.domain: r for r in rows}
    shown = []
    for parent, subdomains in sorted(below.items()):
        if len(subdomains) < min_subdomains:
            continue
        members = [counted[d] for d in subdomains] + (
            [counted[parent]] if parent in counted else []
        )
        shown.append(ShapeRow("." + parent, _sum(members)))
    return shown


def _sum(rows: Sequence[ShapeRow]) -> tuple[int, ...]:
    return tuple(sum(r.buckets[i] for r in rows) for i in range(len(BUCKET_MINUTES) + 1))


def render(total: ShapeRow, rows: Sequence[ShapeRow]) -> str:
    """qshape's layout: numbers right-aligned under their bucket's upper bound."""
    header = ["", "T", *map(str, BUCKET_MINUTES), f"{BUCKET_MINUTES[-1]}+"]
    lines = [header] + [
        [printable(r.domain or "<>"), str(r.total), *map(str, r.buckets)] for r in [total, *rows]
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        " ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
        for line in lines
    )
