"""``backupmx queue …``: list, show, hold, release, delete, flush, bounce, stats.

Human output is a table sized to its content; ``--json`` output keeps the
field names of design.md §4, which outside scripts rely on.  The commands work
through the queue store while ``serve`` runs (SQLite WAL with a busy timeout,
or PostgreSQL), so an admin never has to stop the server.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from backupmx.bounce.notices import Notices
from backupmx.cli import CommandError
from backupmx.config import Config, normalize_domain
from backupmx.queue.database import current_revision, head_revision
from backupmx.queue.state import Event
from backupmx.queue.store import MessageView, Stats, Store


async def open_store(database: str) -> Store:
    """The store, after checking that its schema is the one this version expects."""
    store = Store.open(database)
    try:
        revision = await current_revision(store.engine)
    except Exception:
        await store.close()
        raise
    if revision != head_revision():
        await store.close()
        state = "no schema yet" if revision is None else f"schema revision {revision}"
        raise CommandError(f"the queue database has {state}: run `backupmx db upgrade`")
    return store


def add_parsers(parser: argparse.ArgumentParser) -> None:
    verbs = parser.add_subparsers(dest="queue_verb", required=True)
    listing = verbs.add_parser("list", help="messages still in the queue, oldest first")
    listing.add_argument("--json", action="store_true")
    listing.add_argument(
        "--all", action="store_true", help="include delivered, bounced and expired"
    )
    listing.add_argument("--domain", help="only messages with a recipient in this domain")
    show = verbs.add_parser("show", help="one message: envelope, recipients, headers")
    show.add_argument("id")
    show.add_argument("--raw", action="store_true", help="print the stored message as is")
    show.add_argument("--json", action="store_true")
    for verb, text in (
        ("hold", "keep queued recipients from delivery"),
        ("release", "make held recipients due now"),
        ("delete", "remove messages and all their recipients"),
    ):
        action = verbs.add_parser(verb, help=text)
        action.add_argument("ids", nargs="+", metavar="ID")
    bounce = verbs.add_parser("bounce", help="bounce pending recipients now, with a DSN")
    bounce.add_argument("ids", nargs="+", metavar="ID")
    flush = verbs.add_parser(
        "flush", help="make queued mail due now (a running serve starts within a second)"
    )
    flush.add_argument("ids", nargs="*", metavar="ID")
    flush.add_argument("--domain", help="every queued recipient of this domain")
    flush.add_argument("--all", action="store_true", help="every queued recipient")
    stats = verbs.add_parser("stats", help="counts by state and by domain")
    stats.add_argument("--json", action="store_true")


async def run(args: argparse.Namespace, config: Config) -> int:
    store = await open_store(config.database)
    try:
        verb = args.queue_verb
        if verb == "list":
            found = await store.messages(include_final=args.all, domain=args.domain)
            print(_json([m.to_json() for m in found]) if args.json else render_list(found))
        elif verb == "show":
            if args.raw:
                sys.stdout.buffer.write(await store.body(args.id))
                sys.stdout.buffer.flush()
            else:
                message = await store.message(args.id)
                if args.json:
                    print(_json(message.to_json()))
                else:
                    print(render_message(message, await store.body(args.id)))
        elif verb in ("hold", "release", "delete"):
            changed = await getattr(store, verb)(args.ids)
            noun = "message(s)" if verb == "delete" else "recipient(s)"
            print(f"{verb}: {changed} {noun} of {len(args.ids)} message(s)")
        elif verb == "flush":
            if bool(args.ids) + bool(args.domain) + bool(args.all) != 1:
                raise CommandError("queue flush takes IDs, --domain D or --all (one of them)")
            domain = normalize_domain(args.domain) if args.domain else None
            due = await store.make_due(domain=domain, ids=args.ids or None, retry_down=True)
            print(f"flush: {due} recipient(s) due now")
        elif verb == "bounce":
            notices = Notices(config.hostname, config.delivery.max_queue_lifetime)
            bounced = await store.sweep(Event.BOUNCE, notices.for_admin_bounce, ids=args.ids)
            print(f"bounce: {bounced} recipient(s) bounced, DSNs queued")
        elif verb == "stats":
            stats = await store.stats()
            print(_json(stats.to_json()) if args.json else render_stats(stats))
        return 0
    finally:
        await store.close()


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def _age(then: datetime, now: datetime | None = None) -> str:
    """Age as its largest whole unit, like qshape's buckets: 45s, 12m, 3h, 2d."""
    seconds = max(int(((now or datetime.now(UTC)) - then).total_seconds()), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def render_list(found: Sequence[MessageView]) -> str:
    if not found:
        return "queue is empty"
    rows = []
    for m in found:
        for i, r in enumerate(m.recipients):
            rows.append(
                [
                    m.id if i == 0 else "",
                    _age(m.received_at) if i == 0 else "",
                    str(m.size) if i == 0 else "",
                    (m.sender or "<>") if i == 0 else "",
                    r.address,
                    r.state,
                    str(r.attempts),
                    r.last_error or "",
                ]
            )
    recipients = sum(len(m.recipients) for m in found)
    return table(
        ["ID", "AGE", "SIZE", "SENDER", "RECIPIENT", "STATE", "TRIES", "LAST ERROR"], rows
    ) + (f"\n-- {len(found)} message(s), {recipients} recipient(s)")


def render_message(m: MessageView, body: bytes) -> str:
    header_end = body.find(b"\r\n\r\n")
    headers = body[: header_end if header_end >= 0 else len(body)].decode("utf-8", "replace")
    facts = [
        ("id", m.id),
        ("sender", m.sender or "<>"),
        ("size", str(m.size)),
        ("received", f"{m.received_at.isoformat()} ({_age(m.received_at)} ago)"),
        ("client", f"{m.client_helo} [{m.client_ip}]"),
        ("protocol", m.protocol),
        ("tls", m.tls or "-"),
        ("body", m.body_type),
        ("smtputf8", "yes" if m.smtputf8 else "no"),
        ("dsn", f"RET={m.ret or '-'} ENVID={m.envid or '-'}"),
        ("sha256", m.sha256),
    ]
    rows = [
        [
            r.address,
            r.state,
            str(r.attempts),
            r.next_attempt_at.isoformat(timespec="seconds"),
            r.last_error or "",
        ]
        for r in m.recipients
    ]
    return "\n".join(
        [
            *(f"{k:<10} {v}" for k, v in facts),
            "",
            table(["RECIPIENT", "STATE", "TRIES", "NEXT ATTEMPT", "LAST ERROR"], rows),
            "",
            headers.replace("\r\n", "\n"),
        ]
    )


def render_stats(stats: Stats) -> str:
    lines = [f"messages in queue: {stats.messages}"]
    lines.append("recipients: " + ", ".join(f"{k} {v}" for k, v in stats.recipients.items()))
    if stats.oldest:
        lines.append(
            f"oldest: {stats.oldest.isoformat(timespec='seconds')} ({_age(stats.oldest)} ago)"
        )
    if stats.domains:
        states = list(stats.domains[0].counts)
        rows = [
            [d.domain, *(str(d.counts[s]) for s in states), _age(d.oldest) if d.oldest else "-"]
            for d in stats.domains
        ]
        lines += ["", table(["DOMAIN", *(s.upper() for s in states), "OLDEST"], rows)]
    return "\n".join(lines)
