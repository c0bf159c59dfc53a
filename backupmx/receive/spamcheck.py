"""The spam-check hook: after DATA, before the ``250``, on the message as it will be stored.

Backends (``[spamcheck] backend``):

* ``spamd`` — SpamAssassin's SPAMC/SPAMD protocol (``SYMBOLS SPAMC/1.5``) over TCP
  or a Unix socket; spamd's verdict is ``spam`` or ``ham``.
* ``rspamd`` — rspamd's HTTP ``POST /checkv2``, with the client IP, HELO, sender,
  recipients and queue id as request headers; rspamd's verdict is its action
  (``reject``, ``soft reject``, ``add header``, …).
* ``command`` — a program reads the message on stdin (envelope in ``BACKUPMX_*``
  environment variables).  Exit 0 means ``ham``, 1 ``spam`` (as ``spamc -c``), any
  other status is an error.  The first line of its output may name a verdict and a
  score: ``reject 17.5``, ``spam 7.1/5.0``, or just ``1003.3/5.0`` (``spamc -c``).

The verdict maps to an action through ``actions`` (defaults in
`backupmx.config.DEFAULT_SPAM_ACTIONS`), made stricter by score ``thresholds``:
``reject`` answers ``550 5.7.1``, ``defer`` ``451 4.7.1``, ``tag`` queues the
message with ``X-Spam-*`` headers placed right after our ``Received:``, ``accept``
queues it as is.

Failure: a checker that is down, slower than ``timeout`` or answers nonsense
gives ``on_error`` — ``defer`` (the default: ``451 4.7.1``, never lose mail and
never let spam in unchecked) or ``accept`` (queued with the verdict ``error``).

A check that may not refuse (mail to postmaster, RFC 5321 §4.5.1) turns ``reject``
and ``defer`` into ``tag`` (the detail says what was waived) and a failure into
``error``: the message is queued either way.
Every error is logged and counted in `SpamChecker.counts`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import structlog

from backupmx import metrics
from backupmx.config import SpamAction, SpamCheck
from backupmx.mail import replies
from backupmx.mail.hosts import parse_host_port
from backupmx.queue.records import BodySource

log = structlog.get_logger("backupmx.receive")

SEVERITY: dict[str, int] = {"accept": 0, "tag": 1, "defer": 2, "reject": 3}
MAX_RESPONSE = 1024 * 1024  # a verdict is small; more than this is nonsense
_SPAMD_STATUS = re.compile(rb"^SPAMD/\d+\.\d+ (\d+) (.*)$")
_SPAMD_SPAM = re.compile(
    rb"^Spam: *(True|False|Yes|No) *; *(-?\d+(?:\.\d+)?) */ *(-?\d+(?:\.\d+)?)", re.I | re.M
)
_SCORE = re.compile(r"^(-?\d+(?:\.\d+)?)(?:/(-?\d+(?:\.\d+)?))?$")


class CheckFailed(Exception):
    """The checker could not give a verdict (down, timed out, nonsense)."""


@dataclass(frozen=True)
class Facts:
    """What the checker is told besides the message."""

    client_ip: str
    helo: str
    sender: str  # "" for <>
    recipients: Sequence[str]
    queue_id: str
    hostname: str


@dataclass(frozen=True)
class Scan:
    """A backend's answer."""

    verdict: str  # "spam"/"ham", or rspamd's action ("reject", "add header", …)
    score: float | None = None
    required: float | None = None
    rules: tuple[str, ...] = ()
    message: str = ""  # the backend's own reason (rspamd's smtp_message)


@dataclass(frozen=True)
class Verdict:
    """What to do with the message; `label` is what the queue stores."""

    label: str  # reject, defer, tag, accept, skipped, error
    score: float | None = None
    detail: str = ""  # "spamd: GTUBE,NO_RELAYS"
    reply: str | None = None  # the SMTP refusal; None: queue the message
    headers: bytes = b""  # X-Spam-* fields to add (tag)


@dataclass(frozen=True)
class TaggedBody:
    """The stored form with X-Spam-* fields after our Received: (a `BodySource`)."""

    body: BodySource
    ours: int  # length of our Received: field at the start of `body`
    headers: bytes

    @property
    def size(self) -> int:
        return self.body.size + len(self.headers)

    def read(self) -> bytes:
        data = self.body.read()
        return data[: self.ours] + self.headers + data[self.ours :]

    def portable(self) -> TaggedBody:
        return replace(self, body=self.body.portable())


def decide(scan: Scan, settings: SpamCheck) -> SpamAction:
    """The backend's verdict through `actions`, made stricter by score `thresholds`."""
    action = settings.action_for(scan.verdict)
    if scan.score is not None:
        for name, threshold in settings.thresholds.items():
            if scan.score >= threshold and SEVERITY[name] > SEVERITY[action]:
                action = name
    return action


def spam_headers(scan: Scan, backend: str) -> bytes:
    """SpamAssassin-style fields, as the primary's filter would add them."""
    score = scan.score if scan.score is not None else 0.0
    required = f" required={scan.required:.1f}" if scan.required is not None else ""
    status = f"Yes, score={score:.1f}{required}"
    rules = ",".join(_printable(rule) for rule in scan.rules)
    lines = [
        "X-Spam-Flag: YES",
        f"X-Spam-Score: {score:.1f}",
        "X-Spam-Level: " + "*" * max(0, min(int(score), 50)),
        _fold(f"X-Spam-Status: {status} tests={rules or 'none'} backend={backend}"),
    ]
    return "".join(line + "\r\n" for line in lines).encode("ascii", "replace")


def _fold(field_text: str, width: int = 76) -> str:
    """Fold a structured field at its commas and spaces (RFC 5322 §2.2.3)."""
    out, line = [], ""
    for token in re.split(r"(?<=[, ])", field_text):
        if line and len(line) + len(token) > width:
            out.append(line.rstrip(" "))
            line = "\t"
        line += token
    out.append(line)
    return "\r\n".join(out)


def _printable(text: str, limit: int = 200) -> str:
    return re.sub(r"[^\x20-\x7e]", "?", text)[:limit]


class SpamChecker:
    """Runs the configured backend; stateless apart from its counters."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()  # per label, and "error"

    def _count(self, action: str) -> None:
        self.counts[action] += 1
        metrics.spam_verdict(action)

    async def check(
        self, body: BodySource, facts: Facts, settings: SpamCheck, *, may_refuse: bool = True
    ) -> tuple[Verdict, BodySource]:
        """The verdict on `body` and the body to queue (tagged or as it was)."""
        if settings.backend == "none":
            return Verdict("none"), body
        if body.size > settings.max_size:
            self._count("skipped")
            log.info("spam_check_skipped", size=body.size, max_size=settings.max_size)
            return Verdict("skipped", detail=f"larger than {settings.max_size} bytes"), body
        data = body.read()
        started = time.monotonic()
        try:
            scan = await asyncio.wait_for(self._scan(data, facts, settings), settings.timeout)
        except (CheckFailed, OSError, TimeoutError, ValueError) as error:
            reason = str(error) or type(error).__name__
            if isinstance(error, TimeoutError):
                reason = f"no verdict within {settings.timeout:g}s"
            self._count("error")
            log.error("spam_check_failed", backend=settings.backend, error=reason)
            detail = f"{settings.backend}: {reason}"
            if settings.on_error == "defer" and may_refuse:
                return Verdict("defer", detail=detail, reply=replies.SPAM_CHECK_UNAVAILABLE), body
            return Verdict("error", detail=detail), body
        ms = (time.monotonic() - started) * 1000
        action = decide(scan, settings)
        detail = f"{settings.backend}: {scan.verdict}" + (
            f" {','.join(scan.rules)}" if scan.rules else ""
        )
        if not may_refuse and SEVERITY[action] > SEVERITY["tag"]:
            detail += f" ({action} waived: postmaster)"
            action = "tag"
        self._count(action)
        log.info(
            "spam_checked",
            backend=settings.backend,
            verdict=scan.verdict,
            score=scan.score,
            action=action,
            ms=round(ms, 1),
        )
        verdict = Verdict(action, scan.score, _printable(detail, 1000))
        if action == "reject":
            reason = _printable(scan.message, 100) or (
                f"score {scan.score:.1f}" if scan.score is not None else scan.verdict
            )
            return Verdict(action, scan.score, verdict.detail, replies.spam_rejected(reason)), body
        if action == "defer":
            return Verdict(action, scan.score, verdict.detail, replies.SPAM_DEFERRED), body
        if action == "tag":
            headers = spam_headers(scan, settings.backend)
            ours = _received_length(data)
            return Verdict(action, scan.score, verdict.detail, headers=headers), TaggedBody(
                body, ours, headers
            )
        return verdict, body

    async def _scan(self, data: bytes, facts: Facts, settings: SpamCheck) -> Scan:
        if settings.backend == "spamd":
            return await spamd(data, settings.address)
        if settings.backend == "rspamd":
            return await rspamd(data, facts, settings.address)
        return await command(data, facts, settings.command)


def _received_length(data: bytes) -> int:
    """Length of the first header field (our Received:, with its folded lines)."""
    end = data.find(b"\r\n")
    while end >= 0 and data[end + 2 : end + 3] in (b" ", b"\t"):
        end = data.find(b"\r\n", end + 2)
    return len(data) if end < 0 else end + 2


# --------------------------------------------------------------------------- transports


async def _open(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if address.startswith("/"):
        return await asyncio.open_unix_connection(address, limit=MAX_RESPONSE)
    where = parse_host_port(address)
    return await asyncio.open_connection(where.host, where.port, limit=MAX_RESPONSE)


async def _exchange(address: str, request: bytes) -> bytes:
    """Send `request`, read the answer until the server closes (both protocols close)."""
    reader, writer = await _open(address)
    try:
        writer.write(request)
        await writer.drain()
        response = await reader.read(MAX_RESPONSE + 1)
        while response and len(response) <= MAX_RESPONSE:
            more = await reader.read(MAX_RESPONSE + 1 - len(response))
            if not more:
                break
            response += more
    finally:
        writer.close()
    if len(response) > MAX_RESPONSE:
        raise CheckFailed("answer too long")
    if not response:
        raise CheckFailed("connection closed without an answer")
    return response


# --------------------------------------------------------------------------- spamd


def spamd_request(data: bytes) -> bytes:
    return b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(data) + data


def parse_spamd(response: bytes) -> Scan:
    head, _, body = response.partition(b"\r\n\r\n")
    status = _SPAMD_STATUS.match(head.split(b"\r\n", 1)[0])
    if status is None:
        raise CheckFailed(f"not a SPAMD answer: {response[:60]!r}")
    if status.group(1) != b"0":
        raise CheckFailed(f"spamd: {status.group(1).decode()} {status.group(2).decode()}")
    spam = _SPAMD_SPAM.search(head)
    if spam is None:
        raise CheckFailed("spamd answer has no Spam: line")
    is_spam = spam.group(1).lower() in (b"true", b"yes")
    rules = tuple(r for r in body.decode("ascii", "replace").strip().split(",") if r)
    return Scan(
        "spam" if is_spam else "ham",
        float(spam.group(2)),
        float(spam.group(3)),
        rules,
    )


async def spamd(data: bytes, address: str) -> Scan:
    return parse_spamd(await _exchange(address, spamd_request(data)))


# --------------------------------------------------------------------------- rspamd


def _header_value(text: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f]", "?", text)


def rspamd_request(data: bytes, facts: Facts, host: str) -> bytes:
    headers = [
        ("Host", host),
        ("Connection", "close"),
        ("Content-Length", str(len(data))),
        ("IP", facts.client_ip),
        ("Helo", facts.helo),
        ("From", facts.sender or "<>"),
        *(("Rcpt", r) for r in facts.recipients),
        ("Queue-Id", facts.queue_id),
        ("MTA-Name", facts.hostname),
    ]
    lines = "".join(f"{k}: {_header_value(v)}\r\n" for k, v in headers)
    return f"POST /checkv2 HTTP/1.1\r\n{lines}\r\n".encode("utf-8", "surrogateescape") + data


def parse_rspamd(response: bytes) -> Scan:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise CheckFailed(f"not an HTTP answer: {status_line[:60]!r}")
    if parts[1] != "200":
        raise CheckFailed(f"rspamd answered {status_line[:80]}")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    elif "content-length" in headers:
        body = body[: int(headers["content-length"])]
    try:
        answer = json.loads(body)
        action = str(answer["action"])
        score = float(answer["score"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckFailed(f"rspamd answer is not a verdict: {error}") from error
    required = answer.get("required_score")
    symbols = answer.get("symbols") or {}
    messages = answer.get("messages") or {}
    return Scan(
        action,
        score,
        float(required) if isinstance(required, int | float) else None,
        tuple(sorted(symbols)) if isinstance(symbols, dict) else (),
        str(messages.get("smtp_message", "")) if isinstance(messages, dict) else "",
    )


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


async def rspamd(data: bytes, facts: Facts, address: str) -> Scan:
    host = "localhost" if address.startswith("/") else address
    return parse_rspamd(await _exchange(address, rspamd_request(data, facts, host)))


# --------------------------------------------------------------------------- command


def parse_command_output(status: int, output: bytes) -> Scan:
    """Exit 0 ham, 1 spam; a first line "[verdict] [score[/required]]" refines it."""
    if status not in (0, 1):
        raise CheckFailed(f"exit status {status}: {output[:100]!r}")
    words = output.decode("utf-8", "replace").partition("\n")[0].split()
    score = required = None
    if words and (match := _SCORE.match(words[-1])):
        score = float(match.group(1))
        required = float(match.group(2)) if match.group(2) else None
        words = words[:-1]
    verdict = " ".join(words).lower() or ("spam" if status == 1 else "ham")
    return Scan(verdict, score, required)


async def command(data: bytes, facts: Facts, argv: Sequence[str]) -> Scan:
    environment = dict(
        os.environ,
        BACKUPMX_CLIENT_IP=facts.client_ip,
        BACKUPMX_HELO=_header_value(facts.helo),
        BACKUPMX_SENDER=facts.sender,
        BACKUPMX_RECIPIENTS=" ".join(facts.recipients),
        BACKUPMX_QUEUE_ID=facts.queue_id,
    )
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=environment,
    )
    try:
        output, _ = await process.communicate(data)
    finally:
        if process.returncode is None:  # timed out: the program must not outlive the check
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return parse_command_output(process.returncode, output)
