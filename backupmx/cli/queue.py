"""``backupmx queue …``: list, show, export, hold, release, requeue, delete, flush, bounce, stats.

Human output is a table sized to its content; ``--json`` output keeps the
field names of docs/contracts.md#json-output, which outside scripts rely on.  The commands work
through the queue store while ``serve`` runs (SQLite WAL with a busy timeout,
or PostgreSQL), so an admin never has to stop the server.

`list` and the actions select messages by ID or by filters (`Selection`: domain,
state, sender, recipient, age).  An action given filters first only counts what
it would touch; ``--yes`` carries it out, in batches, with a progress bar on a
terminal.  Actions apply to whole messages, as ``postsuper`` does.  A hold or a
delete cannot take back a recipient that a node is sending: each waits up to
``--wait`` for those deliveries to end, then acts on the rest and names each
recipient it left and the node sending it (exit status 1), never claiming a
success that the node's delivery would undo.

Human output shows what clients and remote hosts sent (HELO, addresses,
headers, replies) through `printable`: a control character reaching the
operator's terminal could move the cursor, retitle the window or forge a line.

A database that cannot be reached says "database unreachable" and exits 1; a
schema older than this version says to run ``backupmx db upgrade``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import fnmatch
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from sqlalchemy.exc import DBAPIError

from backupmx.bounce.notices import Notices
from backupmx.cli import CommandError
from backupmx.config import Config, parse_duration
from backupmx.mail.domains import normalize_domain
from backupmx.queue.database import current_revision, head_revision, missing_sqlite_file, safe_url
from backupmx.queue.records import (
    Acted,
    InFlight,
    MessageView,
    RecipientView,
    SpamRecord,
    Stats,
    oldest_first,
)
from backupmx.queue.state import FINAL, Event, State
from backupmx.queue.store import Store

ACTIONS = ("hold", "release", "requeue", "delete", "bounce")
BATCH = 500  # message IDs per store call in a bulk action: one transaction each
# Actions that a delivery in progress would undo (a held recipient delivered all the same,
# a deleted message sent anyway): they wait for it to end, and say what they left alone.
WAITING_ACTIONS = {"hold": "held", "delete": "deleted"}
# The default --wait: a delivery takes seconds, and the recipients of a node that died
# go back to the queue once its heartbeat is a lease old (`[delivery] lease`, 30 s).
WAIT = 30.0
POLL = 0.5  # seconds between two looks at the recipients being sent, while waiting


async def open_store(database: str) -> Store:
    """The store, after checking that the database answers and that its schema is the
    one this version expects."""
    missing = missing_sqlite_file(database)
    if missing:
        raise CommandError(
            f"database unreachable: {missing} does not exist "
            "(`backupmx serve` or `backupmx db upgrade` creates it)"
        )
    store = Store.open(database)
    try:
        revision = await current_revision(store.engine)
    except DBAPIError as error:
        await store.close()
        reason = " ".join(str(error.orig or error).split())
        raise CommandError(f"database unreachable: {safe_url(database)}: {reason}") from error
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
    add_filters(listing)
    show = verbs.add_parser("show", help="one message: envelope, recipients, headers")
    show.add_argument("id")
    show.add_argument("--raw", action="store_true", help="print the stored message as is")
    show.add_argument("--json", action="store_true")
    export = verbs.add_parser(
        "export", help="the stored message, byte for byte (queue export ID > msg.eml)"
    )
    export.add_argument("id")
    export.add_argument(
        "--json", action="store_true", help="envelope and recipients, with the message in base64"
    )
    for verb, text in (
        ("hold", "keep queued recipients from delivery"),
        ("release", "make held recipients due now"),
        ("requeue", "held and queued recipients become queued and due now (postsuper -r)"),
        ("delete", "remove messages and all their recipients"),
        ("bounce", "bounce pending recipients now, with a DSN"),
    ):
        action = verbs.add_parser(
            verb, help=text, description=f"{text}; by ID, or every message the filters select"
        )
        action.add_argument("ids", nargs="*", metavar="ID")
        add_filters(action)
        action.add_argument(
            "--yes", action="store_true", help="with filters: do it (without: count only)"
        )
        action.add_argument("--json", action="store_true")
        if verb in WAITING_ACTIONS:
            action.add_argument(
                "--wait",
                metavar="SECONDS",
                type=_duration,
                default=WAIT,
                help=f"how long recipients being sent may take to finish (default {WAIT:.0f})",
            )
    flush = verbs.add_parser(
        "flush", help="make queued mail due now (a running serve starts within a second)"
    )
    flush.add_argument("ids", nargs="*", metavar="ID")
    flush.add_argument("--domain", help="every queued recipient of this domain")
    flush.add_argument("--all", action="store_true", help="every queued recipient")
    flush.add_argument("--json", action="store_true")
    stats = verbs.add_parser("stats", help="counts by state and by domain")
    stats.add_argument("--json", action="store_true")


def add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain", help="a recipient in this domain")
    parser.add_argument("--state", choices=[s.value for s in State], help="a recipient in it")
    parser.add_argument(
        "--sender", metavar="PATTERN", help="sender address or glob (*@example.net); <> for null"
    )
    parser.add_argument("--recipient", metavar="PATTERN", help="recipient address or glob")
    parser.add_argument(
        "--older-than", metavar="AGE", type=_duration, help="received before AGE ago (30m, 2h, 3d)"
    )


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


@dataclass(frozen=True)
class Selection:
    """Which messages a listing or an action covers: a message matches when every
    message filter matches and one of its recipients matches every recipient filter.
    By default only recipients still pending count."""

    domain: str | None = None
    state: str | None = None
    sender: str | None = None
    recipient: str | None = None
    older_than: float | None = None
    include_final: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Selection:
        try:
            domain = normalize_domain(args.domain) if args.domain else None
        except ValueError as error:
            raise CommandError(f"--domain: {error}") from error
        return cls(
            domain=domain,
            state=args.state,
            sender=args.sender,
            recipient=args.recipient,
            older_than=args.older_than,
            include_final=getattr(args, "all", False)
            or (args.state is not None and State(args.state) in FINAL),
        )

    @property
    def filtered(self) -> bool:
        fields = (self.domain, self.state, self.sender, self.recipient, self.older_than)
        return any(f is not None for f in fields)

    def matches(self, message: MessageView, now: datetime) -> bool:
        if self.sender is not None and not _like(message.sender, self.sender):
            return False
        if self.older_than is not None and (
            message.received_at > now - timedelta(seconds=self.older_than)
        ):
            return False
        return any(self._recipient_matches(r) for r in message.recipients)

    def _recipient_matches(self, r: RecipientView) -> bool:
        if self.state is not None:
            if r.state != self.state:
                return False
        elif not self.include_final and State(r.state) in FINAL:
            return False
        if self.domain is not None and r.domain != self.domain:
            return False
        return self.recipient is None or _like(r.address, self.recipient)


def _like(address: str, pattern: str) -> bool:
    """Case-insensitive glob; "<>" (or "") is the null sender."""
    if pattern in ("<>", ""):
        return address == ""
    return fnmatch.fnmatchcase(address.lower(), pattern.lower())


async def select(store: Store, selection: Selection) -> AsyncIterator[MessageView]:
    """The messages a selection covers, in queue-id order, read a page at a time."""
    now = datetime.now(UTC)
    pages = store.message_pages(include_final=selection.include_final, domain=selection.domain)
    async for page in pages:
        for message in page:
            if selection.matches(message, now):
                yield message


async def run(args: argparse.Namespace, config: Config) -> int:
    store = await open_store(config.database)
    try:
        verb = args.queue_verb
        if verb == "list":
            found = oldest_first([m async for m in select(store, Selection.from_args(args))])
            print(_json([m.to_json() for m in found]) if args.json else render_list(found))
        elif verb in ACTIONS:
            return await run_action(store, args, config)
        elif verb == "export":
            message = await store.message(args.id)
            _require_body(message)
            body = await store.body(args.id)
            if args.json:
                encoded = base64.b64encode(body).decode()
                print(_json({**message.to_json(), "message_base64": encoded}))
            else:
                sys.stdout.buffer.write(body)
                sys.stdout.buffer.flush()
        elif verb == "show":
            if args.raw:
                _require_body(await store.message(args.id))
                sys.stdout.buffer.write(await store.body(args.id))
                sys.stdout.buffer.flush()
            else:
                message = await store.message(args.id)
                spam = await store.spam_record(args.id)
                if args.json:
                    print(_json({**message.to_json(), "spam": spam.to_json()}))
                else:
                    print(render_message(message, await store.body(args.id), spam))
        elif verb == "flush":
            if bool(args.ids) + bool(args.domain) + bool(args.all) != 1:
                raise CommandError("queue flush takes IDs, --domain D or --all (one of them)")
            domain = normalize_domain(args.domain) if args.domain else None
            due = await store.make_due(domain=domain, ids=args.ids or None, retry_down=True)
            if args.json:
                print(_json({"action": "flush", "recipients": due}))
            else:
                print(f"flush: {due} recipient(s) due now")
        elif verb == "stats":
            stats = await store.stats()
            print(_json(stats.to_json()) if args.json else render_stats(stats))
        return 0
    finally:
        await store.close()


async def run_action(store: Store, args: argparse.Namespace, config: Config) -> int:
    """hold, release, requeue, delete or bounce: the IDs given, or what the filters select.
    Exit status 1 when a hold or a delete left recipients being sent alone."""
    verb = args.queue_verb
    selection = Selection.from_args(args)
    if args.ids and selection.filtered:
        raise CommandError(f"queue {verb} takes IDs or filters, not both")
    if not args.ids and not selection.filtered:
        raise CommandError(f"queue {verb} needs IDs or a filter (--domain, --sender, …)")
    ids = list(args.ids) or [m.id async for m in select(store, selection)]
    if selection.filtered and not args.yes:
        if args.json:
            print(_json({"action": verb, "dry_run": True, "messages": len(ids), "ids": ids}))
        else:
            print(f"{verb}: would act on {len(ids)} message(s); run again with --yes to do it")
        return 0
    changed = 0
    in_flight: list[InFlight] = []
    deadline = time.monotonic() + getattr(args, "wait", 0.0)
    progress = Progress(verb, len(ids))
    for start in range(0, len(ids), BATCH):
        batch = ids[start : start + BATCH]
        if verb in WAITING_ACTIONS:
            await wait_while_sending(store, verb, batch, deadline)
        acted = await apply_action(store, verb, batch, config)
        changed += acted.changed
        in_flight += acted.in_flight
        progress.advance(len(batch))
    progress.done()
    noun = "message(s)" if verb == "delete" else "recipient(s)"
    if args.json:
        done: dict[str, Any] = {
            "action": verb,
            "dry_run": False,
            "messages": len(ids),
            "changed": changed,
        }
        if verb in WAITING_ACTIONS:
            done["in_flight"] = [r.to_json() for r in in_flight]
        print(_json(done))
    else:
        if verb == "bounce":
            print(f"bounce: {changed} recipient(s) bounced, DSNs queued")
        else:
            print(f"{verb}: {changed} {noun} of {len(ids)} message(s)")
        for line in left_alone(verb, in_flight):
            print(f"backupmx: {line}", file=sys.stderr)
    return 1 if in_flight else 0


async def wait_while_sending(store: Store, verb: str, ids: Sequence[str], deadline: float) -> None:
    """Wait until no recipient of these messages is being sent, or until `deadline`."""
    sending = await store.in_flight(ids)
    if sending and sys.stderr.isatty():
        wait = max(deadline - time.monotonic(), 0)
        print(
            f"{verb}: waiting up to {wait:.0f}s for {len(sending)} recipient(s) being sent",
            file=sys.stderr,
        )
    while sending and time.monotonic() < deadline:
        await asyncio.sleep(POLL)
        sending = await store.in_flight(ids)


def left_alone(verb: str, in_flight: Sequence[InFlight]) -> list[str]:
    """One line per recipient a hold or a delete did not touch, naming its node."""
    return [
        f"{r.message_id} <{printable(r.recipient)}>: not {WAITING_ACTIONS[verb]}:"
        f" being sent by node {r.lease_owner or '(unknown)'}"
        for r in in_flight
    ]


async def apply_action(store: Store, verb: str, ids: Sequence[str], config: Config) -> Acted:
    """One batch: how many recipients changed (messages, for delete), and for hold and
    delete the recipients being sent that they left alone."""
    if verb == "delete":
        return await store.delete(ids)
    if verb == "hold":
        return await store.hold(ids)
    if verb == "release":
        return Acted(await store.release(ids), [])
    if verb == "requeue":
        released = await store.release(ids)
        return Acted(released + await store.make_due(ids=ids, retry_down=True), [])
    notices = Notices(config.hostname, config.delivery.max_queue_lifetime)
    bounced = 0
    # sweep takes a bounded number of recipients per transaction: repeat until none is left.
    while swept := await store.sweep(Event.BOUNCE, notices.for_admin_bounce, ids=ids):
        bounced += swept
    return Acted(bounced, [])


class Progress:
    """A one-line progress bar on stderr, drawn only on a terminal and for more than one batch."""

    WIDTH = 30

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.count = 0
        self.shown = self.stream.isatty() and total > BATCH

    def advance(self, count: int) -> None:
        self.count += count
        if self.shown:
            self.stream.write("\r" + self.line())
            self.stream.flush()

    def line(self) -> str:
        filled = self.WIDTH * self.count // max(self.total, 1)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        return f"{self.label} [{bar}] {self.count}/{self.total}"

    def done(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def _age(then: datetime, now: datetime | None = None) -> str:
    """Age as its largest whole unit, like qshape's buckets: 45s, 12m, 3h, 2d."""
    return _span(((now or datetime.now(UTC)) - then).total_seconds())


def _span(duration: float) -> str:
    """Seconds as their largest whole unit: 45s, 12m, 3h, 2d."""
    seconds = max(int(duration), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# C0 but TAB, DEL and C1 (ECMA-48, C1 as U+0080-U+009F once decoded): a terminal
# acts on them, and ESC or CSI starts a sequence.  With them escaped the rest of a
# sequence is inert text.  TAB only moves the cursor on (and folds headers).
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Client- or remote-supplied text for a terminal: control characters as ``\\xNN``."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    rows = [[printable(cell) for cell in row] for row in rows]
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


def _require_body(message: MessageView) -> None:
    if message.finished_at is not None:
        raise CommandError(
            f"{message.id} is finished (every recipient delivered, bounced or expired)"
            f" since {message.finished_at.isoformat(timespec='seconds')}: its body was removed"
        )


def render_message(m: MessageView, body: bytes, spam: SpamRecord | None = None) -> str:
    header_end = body.find(b"\r\n\r\n")
    headers = body[: header_end if header_end >= 0 else len(body)].decode("utf-8", "replace")
    if m.finished_at is not None:
        headers = "(finished: the body was removed; this record goes after [queue] keep_finished)"
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
        ("spam", _spam(spam)),
        *([("finished", m.finished_at.isoformat(timespec="seconds"))] if m.finished_at else []),
    ]
    rows = [
        [
            r.address,
            r.state,
            r.lease_owner or "",
            str(r.attempts),
            r.next_attempt_at.isoformat(timespec="seconds"),
            r.last_error or "",
        ]
        for r in m.recipients
    ]
    return "\n".join(
        [
            *(f"{k:<10} {printable(v)}" for k, v in facts),
            "",
            table(
                ["RECIPIENT", "STATE", "SENDING ON", "TRIES", "NEXT ATTEMPT", "LAST ERROR"], rows
            ),
            "",
            "\n".join(printable(line) for line in headers.split("\r\n")),
        ]
    )


def _spam(spam: SpamRecord | None) -> str:
    """The spam check's verdict: "tag score=7.3 (spamd: spam BAYES_99)", or "-"."""
    if spam is None or spam.verdict is None:
        return "-"
    score = f" score={spam.score:.1f}" if spam.score is not None else ""
    return f"{spam.verdict}{score}" + (f" ({spam.detail})" if spam.detail else "")


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
