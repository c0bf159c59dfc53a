"""``backupmx queue …``: list, show, export, hold, release, requeue, delete, flush, bounce, stats.

Human output is a table sized to its content; ``--json`` output keeps the
field names of docs/contracts.md#json-output, which outside scripts rely on.  The commands work
through the queue store while ``serve`` runs (SQLite WAL with a busy timeout,
or PostgreSQL), so an admin never has to stop the server.

`list` and the actions select recipients (`backupmx.queue.selection`): by queue
ID (given, or read from standard input for ``-``, as ``postsuper -d -``), by
filters (domain, state, sender, recipient, client, subject, age, size), or both,
the filters then narrowing within those messages.  An action covers exactly the
recipients that `list` with the same IDs and filters shows, and no other
recipient of their messages; a delete removes a message with its last
recipient.  IDs alone cover every recipient of their messages.  With IDs, or
with ``--all`` (every pending recipient, as ``postsuper -h ALL``), an action
acts at once; with filters alone it first only counts what it would touch, and
``--yes`` carries it out.  It works a page of messages at a time, with a
progress bar on a terminal.  Unknown IDs are named on stderr, one a line, and
make the exit status 1; the others are acted on.  A hold or a delete cannot
take back a recipient that a node is sending: each waits up to ``--wait`` for
those deliveries to end, then acts on the rest and names each recipient it left
and the node sending it (exit status 1), never claiming a success that the
node's delivery would undo.

Listings stream: `list` writes each page as it is read (``--json`` as one array
written element by element), so a listing of a million messages holds one page.

Human output goes through `backupmx.cli.output` (`printable`: no control character
from a client or a remote host reaches the operator's terminal).

A database that cannot be reached says "database unreachable" and exits 1; a
schema older than this version says to run ``backupmx db upgrade``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import re
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any, TextIO

from sqlalchemy.exc import DBAPIError

from backupmx.bounce.notices import Notices
from backupmx.cli import CommandError, UsageError, shape
from backupmx.cli.output import age, aligned, column_widths, json_text, printable, table
from backupmx.config import Config, parse_duration, parse_size
from backupmx.mail.domains import normalize_domain
from backupmx.queue.database import current_revision, head_revision, missing_sqlite_file, safe_url
from backupmx.queue.records import (
    Acted,
    History,
    InFlight,
    MessageView,
    SpamRecord,
    Stats,
)
from backupmx.queue.selection import Selection, pattern
from backupmx.queue.state import FINAL, Event, State
from backupmx.queue.store import Store

ACTIONS = ("hold", "release", "requeue", "delete", "bounce")
BATCH = 500  # messages per page of an action
# Recipient ids per store call (one transaction each): short enough that mail being
# received, which waits for SQLite's one writer, waits for one batch at most.
RECIPIENT_BATCH = 1000
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
    listing = verbs.add_parser(
        "list",
        help="messages still in the queue, oldest first",
        description="messages still in the queue, oldest first, each with the recipients "
        "the IDs and filters select (by default its pending ones)",
    )
    add_ids(listing)
    listing.add_argument("--json", action="store_true")
    only = listing.add_mutually_exclusive_group()
    only.add_argument(
        "--ids",
        dest="ids_only",
        action="store_true",
        help="print only the queue IDs, one a line (for `queue hold -`)",
    )
    only.add_argument(
        "--count",
        action="store_true",
        help="print only the number of messages (--json: messages and recipients)",
    )
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
            verb,
            help=text,
            description=f"{text}: the recipients that `queue list` with the same IDs and "
            "filters shows",
        )
        add_ids(action)
        add_filters(action)
        action.add_argument(
            "--all", action="store_true", help="every pending recipient, at once (no --yes)"
        )
        action.add_argument(
            "--yes", action="store_true", help="with filters alone: do it (without: count only)"
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
    add_ids(flush)
    flush.add_argument("--domain", help="every queued recipient of this domain")
    flush.add_argument("--all", action="store_true", help="every queued recipient")
    flush.add_argument("--json", action="store_true")
    stats = verbs.add_parser("stats", help="counts by state and by domain")
    stats.add_argument("--json", action="store_true")
    shape.add_parser(verbs)


def add_ids(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ids", nargs="*", metavar="ID", help="queue IDs; - reads them from standard input"
    )


def add_filters(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "filters", "each selects recipients; a recipient is selected when all match"
    )
    group.add_argument("--domain", help="a recipient in this domain")
    group.add_argument("--state", choices=[s.value for s in State], help="a recipient in it")
    group.add_argument(
        "--sender", metavar="PATTERN", help="sender address or glob (*@example.net); <> for null"
    )
    group.add_argument("--recipient", metavar="PATTERN", help="recipient address or glob")
    for field, text in (
        ("sender", "the sender address ('' for <>)"),
        ("recipient", "the recipient address"),
        ("subject", "the decoded Subject"),
        ("client", "the client's IP address or HELO name"),
    ):
        group.add_argument(
            f"--{field}-regex",
            metavar="REGEX",
            type=_regex,
            help=f"a Python regular expression found in {text}, ignoring case",
        )
    group.add_argument(
        "--older-than", metavar="AGE", type=_duration, help="received before AGE ago (30m, 2h, 3d)"
    )
    group.add_argument(
        "--younger-than", metavar="AGE", type=_duration, help="received less than AGE ago"
    )
    group.add_argument(
        "--larger-than", metavar="SIZE", type=_size, help="larger than SIZE bytes (10k, 1M, 2MiB)"
    )


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _regex(text: str) -> re.Pattern[str]:
    try:
        return pattern(text)
    except re.error as error:
        message = f"{text!r} is not a regular expression: {error}"
        raise argparse.ArgumentTypeError(message) from error


def selection_of(args: argparse.Namespace, ids: Sequence[str] | None) -> Selection:
    """What the filters and IDs of a command line select.  IDs alone: every recipient
    of those messages; otherwise the pending recipients unless a final state is asked
    for or a listing says --all."""
    try:
        domain = normalize_domain(args.domain) if args.domain else None
    except ValueError as error:
        raise UsageError(f"--domain: {error}") from error
    selection = Selection(
        ids=None if ids is None else tuple(ids),
        domain=domain,
        state=args.state,
        sender=args.sender,
        recipient=args.recipient,
        sender_regex=args.sender_regex,
        recipient_regex=args.recipient_regex,
        subject_regex=args.subject_regex,
        client_regex=args.client_regex,
        older_than=args.older_than,
        younger_than=args.younger_than,
        larger_than=args.larger_than,
    )
    include_final = (
        (args.queue_verb == "list" and args.all)
        or (args.state is not None and State(args.state) in FINAL)
        or (ids is not None and not selection.filtered)
    )
    return replace(selection, include_final=include_final)


async def known_ids(store: Store, given: Sequence[str]) -> tuple[list[str], list[str]]:
    """The IDs given, ``-`` replaced by those on standard input (separated by white
    space), each once: those in the queue, and those not, each named on stderr."""
    ids: list[str] = []
    for arg in given:
        ids += sys.stdin.read().split() if arg == "-" else [arg]
    ids = list(dict.fromkeys(ids))
    unknown = await store.unknown(ids)
    for queue_id in unknown:
        print(f"backupmx: {printable(queue_id)}: no such message in the queue", file=sys.stderr)
    missing = set(unknown)
    return [i for i in ids if i not in missing], unknown


async def run(args: argparse.Namespace, config: Config) -> int:
    store = await open_store(config.database)
    try:
        verb = args.queue_verb
        if verb == "list":
            return await run_list(store, args)
        if verb in ACTIONS:
            return await run_action(store, args, config)
        elif verb == "export":
            message = await store.message(args.id)
            _require_body(message)
            body = await store.body(args.id)
            if args.json:
                encoded = base64.b64encode(body).decode()
                print(json_text({**message.to_json(), "message_base64": encoded}))
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
                histories = await store.histories(message)
                if args.json:
                    shown = {**message.to_json(), "spam": spam.to_json()}
                    for view, r in zip(shown["recipients"], message.recipients, strict=True):
                        view.update(histories[r.id].to_json())
                    print(json_text(shown))
                else:
                    body = await store.body(args.id)
                    print(render_message(message, body, spam, histories))
        elif verb == "flush":
            if bool(args.ids) + bool(args.domain) + bool(args.all) != 1:
                raise UsageError("queue flush takes IDs, --domain D or --all (one of them)")
            try:
                domain = normalize_domain(args.domain) if args.domain else None
            except ValueError as error:
                raise UsageError(f"--domain: {error}") from error
            ids, unknown = await known_ids(store, args.ids) if args.ids else (None, [])
            due = await store.make_due(domain=domain, ids=ids, retry_down=True)
            if args.json:
                print(json_text({"action": "flush", "recipients": due, "unknown": unknown}))
            else:
                print(f"flush: {due} recipient(s) due now")
            return 1 if unknown else 0
        elif verb == "stats":
            stats = await store.stats()
            print(json_text(stats.to_json()) if args.json else render_stats(stats))
        elif verb == "shape":
            return await shape.run(store, args)
        return 0
    finally:
        await store.close()


async def run_list(store: Store, args: argparse.Namespace) -> int:
    """The selected messages, streamed a page at a time.  Exit status 1 when an ID
    given is not in the queue (the others are listed)."""
    ids, unknown = await known_ids(store, args.ids) if args.ids else (None, [])
    selection = selection_of(args, ids)
    pages = store.pages(selection)
    found = (m async for page in pages for m in page)
    if args.count:
        messages = recipients = 0
        async for m in found:
            messages, recipients = messages + 1, recipients + len(m.recipients)
        print(
            json_text({"messages": messages, "recipients": recipients}) if args.json else messages
        )
    elif args.ids_only and args.json:
        await write_json_array((m.id async for m in found), sys.stdout)
    elif args.ids_only:
        async for m in found:
            print(m.id)
    elif args.json:
        await write_json_array((m.to_json() async for m in found), sys.stdout)
    elif not await write_list(pages, sys.stdout):
        print("no message matches" if selection.filtered or ids is not None else "queue is empty")
    return 1 if unknown else 0


async def run_action(store: Store, args: argparse.Namespace, config: Config) -> int:
    """hold, release, requeue, delete or bounce of the recipients selected.  Exit
    status 1 when an ID given is not in the queue, or when a hold or a delete left
    recipients being sent alone."""
    verb = args.queue_verb
    ids, unknown = await known_ids(store, args.ids) if args.ids else (None, [])
    selection = selection_of(args, ids)
    if args.all and (ids is not None or selection.filtered):
        raise UsageError(f"queue {verb} --all takes no IDs or filters")
    if ids is None and not selection.filtered and not args.all:
        raise UsageError(
            f"queue {verb} needs IDs (- reads them from standard input), a filter or --all"
        )
    if ids is None and selection.filtered and not args.yes:
        return await dry_run(store, verb, selection, args.json)
    messages = recipients = changed = deleted = 0
    in_flight: list[InFlight] = []
    deadline = time.monotonic() + getattr(args, "wait", 0.0)
    progress = Progress(verb, None if ids is None else len(ids))
    async for page in store.pages(selection, BATCH):
        chosen = [r.id for m in page for r in m.recipients]
        for start in range(0, len(chosen), RECIPIENT_BATCH):
            batch = chosen[start : start + RECIPIENT_BATCH]
            if verb in WAITING_ACTIONS:
                await wait_while_sending(store, verb, batch, deadline)
            acted = await apply_action(store, verb, batch, config)
            changed, deleted = changed + acted.changed, deleted + acted.deleted
            in_flight += acted.in_flight
        messages, recipients = messages + len(page), recipients + len(chosen)
        progress.advance(len(page))
    progress.done()
    if args.json:
        done: dict[str, Any] = {
            "action": verb,
            "dry_run": False,
            "messages": messages,
            "recipients": recipients,
            # As before recipients were selected: a delete counts the messages it removed.
            "changed": deleted if verb == "delete" else changed,
            "unknown": unknown,
        }
        if verb == "delete":
            done["removed"] = changed
        if verb in WAITING_ACTIONS:
            done["in_flight"] = [r.to_json() for r in in_flight]
        print(json_text(done))
    else:
        if verb == "bounce":
            print(f"bounce: {changed} recipient(s) bounced, DSNs queued")
        elif verb == "delete":
            print(
                f"delete: {changed} recipient(s) of {messages} message(s) removed,"
                f" {deleted} message(s) deleted with their last recipient"
            )
        else:
            print(f"{verb}: {changed} recipient(s) of {messages} message(s)")
        for line in left_alone(verb, in_flight):
            print(f"backupmx: {line}", file=sys.stderr)
    return 1 if in_flight or unknown else 0


async def dry_run(store: Store, verb: str, selection: Selection, as_json: bool) -> int:
    """What an action given filters alone would act on, without --yes."""
    ids: list[str] = []
    recipients = 0
    async for page in store.pages(selection, BATCH):
        ids += [m.id for m in page]
        recipients += sum(len(m.recipients) for m in page)
    if as_json:
        print(
            json_text(
                {
                    "action": verb,
                    "dry_run": True,
                    "messages": len(ids),
                    "recipients": recipients,
                    "ids": ids,
                }
            )
        )
    else:
        print(
            f"{verb}: would act on {recipients} recipient(s) of {len(ids)} message(s);"
            " run again with --yes to do it"
        )
    return 0


async def wait_while_sending(
    store: Store, verb: str, recipient_ids: Sequence[int], deadline: float
) -> None:
    """Wait until none of these recipients is being sent, or until `deadline`."""
    sending = await store.in_flight(recipient_ids)
    if sending and sys.stderr.isatty():
        wait = max(deadline - time.monotonic(), 0)
        print(
            f"{verb}: waiting up to {wait:.0f}s for {len(sending)} recipient(s) being sent",
            file=sys.stderr,
        )
    while sending and time.monotonic() < deadline:
        await asyncio.sleep(POLL)
        sending = await store.in_flight(recipient_ids)


def left_alone(verb: str, in_flight: Sequence[InFlight]) -> list[str]:
    """One line per recipient a hold or a delete did not touch, naming its node."""
    return [
        f"{r.message_id} <{printable(r.recipient)}>: not {WAITING_ACTIONS[verb]}:"
        f" being sent by node {r.lease_owner or '(unknown)'}"
        for r in in_flight
    ]


async def apply_action(
    store: Store, verb: str, recipient_ids: Sequence[int], config: Config
) -> Acted:
    """One batch of recipients: how many changed (were removed, for delete), and for
    hold and delete those being sent that they left alone."""
    if verb == "delete":
        return await store.delete(recipient_ids)
    if verb == "hold":
        return await store.hold(recipient_ids)
    if verb == "release":
        return Acted(await store.release(recipient_ids), [])
    if verb == "requeue":
        released = await store.release(recipient_ids)
        due = await store.make_due(recipient_ids=recipient_ids, retry_down=True)
        return Acted(released + due, [])
    notices = Notices(config.hostname, config.delivery.max_queue_lifetime)
    bounced = 0
    # sweep takes a bounded number of recipients per transaction: repeat until none is left.
    while swept := await store.sweep(
        Event.BOUNCE, notices.for_admin_bounce, recipient_ids=recipient_ids
    ):
        bounced += swept
    return Acted(bounced, [])


class Progress:
    """A one-line progress bar on stderr, drawn only on a terminal and for more than one
    batch; a count of messages when the total is not known in advance (filters)."""

    WIDTH = 30

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.count = 0
        self.shown = self.stream.isatty() and (total is None or total > BATCH)
        self.drawn = False

    def advance(self, count: int) -> None:
        self.count += count
        if self.shown and (self.total is not None or self.count > BATCH):
            self.stream.write("\r" + self.line())
            self.stream.flush()
            self.drawn = True

    def line(self) -> str:
        if self.total is None:
            return f"{self.label} {self.count} message(s)"
        filled = self.WIDTH * self.count // max(self.total, 1)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        return f"{self.label} [{bar}] {self.count}/{self.total}"

    def done(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


async def write_json_array(items: AsyncIterator[Any], out: TextIO) -> int:
    """`items` as one JSON array, written element by element, byte for byte as `_json`
    writes the whole list; how many there were."""
    count = 0
    async for item in items:
        out.write(("[\n" if count == 0 else ",\n") + textwrap.indent(json_text(item), "  "))
        count += 1
    out.write("\n]\n" if count else "[]\n")
    return count


LIST_HEADERS = ["ID", "AGE", "SIZE", "SENDER", "RECIPIENT", "STATE", "TRIES", "LAST ERROR"]


async def write_list(pages: AsyncIterator[list[MessageView]], out: TextIO) -> bool:
    """The table of `queue list`, a page at a time: its columns are as wide as the
    first page needs, and widen for a longer cell of a later page.  False when
    there was nothing to list."""
    widths: list[int] | None = None
    messages = recipients = 0
    async for page in pages:
        rows = [[printable(cell) for cell in row] for m in page for row in list_rows(m)]
        needed = column_widths(LIST_HEADERS, rows)
        if widths is None:
            out.write(aligned(LIST_HEADERS, needed) + "\n")
        widths = [max(pair) for pair in zip(widths or needed, needed, strict=True)]
        out.write("".join(aligned(row, widths) + "\n" for row in rows))
        messages += len(page)
        recipients += len(rows)
    if messages:
        out.write(f"-- {messages} message(s), {recipients} recipient(s)\n")
    return messages > 0


def list_rows(m: MessageView) -> list[list[str]]:
    """A message's rows: the first with the envelope, one per listed recipient."""
    return [
        [
            m.id if i == 0 else "",
            age(m.received_at) if i == 0 else "",
            str(m.size) if i == 0 else "",
            (m.sender or "<>") if i == 0 else "",
            r.address,
            r.state,
            str(r.attempts),
            r.last_error or "",
        ]
        for i, r in enumerate(m.recipients)
    ]


def _require_body(message: MessageView) -> None:
    if message.finished_at is not None:
        raise CommandError(
            f"{message.id} is finished (every recipient delivered, bounced or expired)"
            f" since {message.finished_at.isoformat(timespec='seconds')}: its body was removed"
        )


def render_message(
    m: MessageView,
    body: bytes,
    spam: SpamRecord | None = None,
    histories: dict[int, History] | None = None,
) -> str:
    header_end = body.find(b"\r\n\r\n")
    headers = body[: header_end if header_end >= 0 else len(body)].decode("utf-8", "replace")
    if m.finished_at is not None:
        headers = "(finished: the body was removed; this record goes after [queue] keep_finished)"
    facts = [
        ("id", m.id),
        ("sender", m.sender or "<>"),
        ("size", str(m.size)),
        ("received", f"{m.received_at.isoformat()} ({age(m.received_at)} ago)"),
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
            *([render_attempts(m, histories), ""] if histories is not None else []),
            "\n".join(printable(line) for line in headers.split("\r\n")),
        ]
    )


def render_attempts(m: MessageView, histories: dict[int, History]) -> str:
    """Each recipient's kept delivery attempts, oldest first, after a line saying how
    many earlier ones are not kept."""
    rows = []
    for r in m.recipients:
        history = histories[r.id]
        lines = [
            [str(a.number), a.at.isoformat(timespec="seconds"), a.host or "-", a.outcome,
             a.reply or ""]
            for a in history.attempts
        ]  # fmt: skip
        if history.not_kept:
            lines.insert(0, ["…", "", "", "", f"{history.not_kept} earlier attempt(s) not kept"])
        rows += [[r.address if i == 0 else "", *line] for i, line in enumerate(lines)]
    if not rows:
        return "no delivery attempt yet"
    return table(["RECIPIENT", "ATTEMPT", "AT", "HOST", "OUTCOME", "REPLY"], rows)


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
            f"oldest: {stats.oldest.isoformat(timespec='seconds')} ({age(stats.oldest)} ago)"
        )
    if stats.domains:
        states = list(stats.domains[0].counts)
        rows = [
            [d.domain, *(str(d.counts[s]) for s in states), age(d.oldest) if d.oldest else "-"]
            for d in stats.domains
        ]
        lines += ["", table(["DOMAIN", *(s.upper() for s in states), "OLDEST"], rows)]
    return "\n".join(lines)
