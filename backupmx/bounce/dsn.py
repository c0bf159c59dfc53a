"""Delivery status notifications (RFC 3464) as bytes, and whether to send one (RFC 3461).

Pure: `build_dsn` turns an original envelope, its message and per-recipient
reports into a complete ``multipart/report; report-type=delivery-status``
message; `should_send_dsn` applies NOTIFY and the never-bounce-a-bounce rule.
The caller queues the DSN from the null sender ``<>`` to the original sender.

Promises:

* Every line ends in CRLF; there is no bare CR or LF anywhere (invariant 6),
  even if the original had some, and no line is longer than `MAX_LINE` octets
  (RFC 5322 §2.1.1, RFC 5321 §4.5.3.1.6), in any part.  A longer header line of
  the original is folded at its spaces (RFC 5322 §2.2.3, which loses nothing);
  what cannot be folded, and a longer body line, is cut at `MAX_LINE`, and the
  human-readable part says how many lines were cut.  Apart from that, the
  original is included byte for byte, 8-bit content included
  (``Content-Transfer-Encoding: 8bit`` on the parts that carry it and on the
  whole report).
* The DSN is sent as it is, never downgraded, as Postfix's bounce daemon does:
  the caller sends it with BODY=8BITMIME when `is_8bit` says so (RFC 6152 §3)
  and with SMTPUTF8 when `needs_smtputf8` says so (RFC 6531 §3.4: its envelope
  or its own header section is not ASCII).  Downgrading would rewrite the
  returned original, and a UTF-8 sender cannot be written in ASCII at all.
* RFC 6533: a status block with a non-ASCII address or text makes the report a
  ``message/global-delivery-status`` with ``utf-8`` address types; the original
  of an SMTPUTF8 message comes back as ``message/global`` or
  ``message/global-headers`` (Postfix decides by the same flag).
* Returned headers are bounded by `RETURN_HEADERS_LIMIT`, the cut stated.
* ``Remote-MTA`` is a DNS name (RFC 3464 §2.3.5) or left out; the address and
  port of the host are in the human-readable text only (`RecipientReport.remote_host`).
* The MIME boundary never occurs in the included original.
* ENVID and ORCPT are xtext-decoded (RFC 3461 §4) into ``Original-Envelope-Id``
  and ``Original-Recipient``.
* What is returned (RFC 3461 §4.3): RET applies to failure reports only.  A
  failure with ``RET=FULL`` returns the whole message as ``message/rfc822`` up to
  `RETURN_SIZE_LIMIT` bytes (Postfix's ``bounce_size_limit``), and its headers
  beyond that.  ``RET=HDRS``, no RET, delays and successes return the headers
  only (``text/rfc822-headers``).  Postfix returns the full message when RET is
  absent; RFC 3461 leaves it to the MTA, and a backup's failure reports go
  mostly to forged senders of spam, so the smaller answer is the default here.

On malformed input (no recipients, the null sender, a status that is not
``class.subject.detail``, CR or LF in a header value) `build_dsn` raises
ValueError: a DSN is never sent half-formed.
"""

from __future__ import annotations

import re
import secrets
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from enum import StrEnum

from backupmx.mail.reply import one_line

# Postfix's bounce_size_limit: a larger original is returned as headers only.
RETURN_SIZE_LIMIT = 50_000
# The returned header section, at most.  Real header sections are a few KiB (a
# long Received chain with DKIM and ARC signatures stays under 20 KiB), but one
# header line may be as large as max_message_size, and a failure report goes
# mostly to forged senders: without a bound it is backscatter of any size.
RETURN_HEADERS_LIMIT = 64 * 1024
# RFC 5322 §2.1.1 and RFC 5321 §4.5.3.1.6: octets in a line, without its CRLF.
MAX_LINE = 998

_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_SMTP_REPLY = re.compile(r"[245]\d\d(?:[ -]|$)")
_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_WSP = re.compile(rb"[ \t]")
_LONGEST_WORD = 900  # octets of one unbroken word in a field we write
# RFC 6533 §3: QCHAR, what utf-8-addr-unitext takes as it is (besides non-ASCII).
_NOT_QCHAR = re.compile(r"[\x00-\x20+=\\\x7f]")


class Action(StrEnum):
    """RFC 3464 §2.3.3."""

    FAILED = "failed"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    RELAYED = "relayed"
    EXPANDED = "expanded"


_SUBJECTS = {
    Action.FAILED: "Undelivered Mail Returned to Sender",
    Action.DELAYED: "Delayed Mail (still being retried)",
    Action.DELIVERED: "Successful Mail Delivery Report",
}

_INTRODUCTIONS = {
    Action.FAILED: "Your message could not be delivered to the recipients below.",
    Action.DELAYED: (
        "Your message could not be delivered yet to the recipients below. "
        "Delivery is being retried; you do not need to send it again."
    ),
    Action.DELIVERED: "Your message was delivered to the recipients below.",
    Action.RELAYED: (
        "Your message was passed on to the recipients' mail system, which does "
        "not send delivery notifications; this is the last report you will receive."
    ),
    Action.EXPANDED: "Your message was delivered to the recipients below, which are lists.",
}


@dataclass(frozen=True)
class RecipientReport:
    final_recipient: str  # the address as we relayed it (RCPT TO, no angle brackets)
    action: Action
    status: str  # RFC 3463, e.g. "5.1.1"
    original_recipient: str | None = None  # the ORCPT parameter as received: "rfc822;a+2Bb@x"
    remote_mta: str | None = None  # DNS name of the server that answered (RFC 3464 §2.3.5)
    remote_host: str | None = None  # for people: "mx1.example.test[192.0.2.1]:25"
    diagnostic: str | None = None  # "550 5.1.1 unknown user", or our own reason
    # RFC 3464 diagnostic-type; None: "smtp" for a text that starts with a reply
    # code, "X-Backupmx" for our own reasons (no route, expired, null MX).
    diagnostic_type: str | None = None
    last_attempt_date: datetime | None = None
    will_retry_until: datetime | None = None  # delayed only; default: build_dsn's retry_until


def should_send_dsn(sender: str, notify: str | None, action: Action | str) -> bool:
    """RFC 3461 §4.1: does this recipient's result call for a DSN?

    Never to the null sender (a DSN is sent from ``<>`` and must not be answered).
    NOTIFY absent means FAILURE,DELAY; NEVER means none; success-type actions
    (delivered, relayed, expanded) only with SUCCESS.
    """
    if sender in ("", "<>"):
        return False
    words = set(notify.upper().split(",")) if notify else {"FAILURE", "DELAY"}
    if "NEVER" in words:
        return False
    action = Action(action)
    if action is Action.FAILED:
        return "FAILURE" in words
    if action is Action.DELAYED:
        return "DELAY" in words
    return "SUCCESS" in words


def build_dsn(
    *,
    reporting_mta: str,
    sender: str,
    queue_id: str,
    arrival_date: datetime,
    original: bytes,
    recipients: Sequence[RecipientReport],
    date: datetime,
    envid: str | None = None,
    ret: str | None = None,
    smtputf8: bool = False,
    retry_until: datetime | None = None,
    return_size_limit: int = RETURN_SIZE_LIMIT,
    token: str | None = None,
) -> bytes:
    """The complete DSN message (headers and body) for ``recipients`` of one message.

    ``envid``, ``ret`` and ``smtputf8`` are the MAIL parameters as received;
    ``date`` is now; ``token`` makes the Message-ID and boundary unique (random
    when None).
    """
    if not recipients:
        raise ValueError("a DSN needs at least one recipient report")
    if sender in ("", "<>"):
        raise ValueError("no DSN is ever sent to the null sender")
    for value in (reporting_mta, sender, queue_id):
        _check_header_value(value)
    actions = {report.action for report in recipients}
    token = token or secrets.token_hex(8)

    failed = Action.FAILED in actions
    full = failed and (ret or "").upper() == "FULL" and len(original) <= return_size_limit
    returned = _returned(_crlf(original), full)
    notification = _notification(reporting_mta, recipients, failed, full, ret, returned)
    report = _delivery_status(reporting_mta, queue_id, envid, arrival_date, recipients, retry_until)
    boundary = _boundary(
        f"{_safe(queue_id)}.{token}/{reporting_mta}", notification + report + returned.content
    )
    # RFC 6533 §6: the "global" types where UTF-8 is (status) or may be (returned).
    status_type = f"message/{'' if report.isascii() else 'global-'}delivery-status"
    if full:
        returned_type = "message/global" if smtputf8 else "message/rfc822"
    else:
        returned_type = "message/global-headers" if smtputf8 else "text/rfc822-headers"
    parts = [
        _part(
            [
                "Content-Description: Notification",
                f"Content-Type: text/plain; charset={_charset(notification)}",
            ],
            notification,
        ),
        _part(["Content-Description: Delivery report", f"Content-Type: {status_type}"], report),
        _part(
            [
                f"Content-Description: Undelivered message{'' if full else ' (headers only)'}",
                f"Content-Type: {returned_type}",
            ],
            returned.content,
        ),
    ]
    body = b"This is a MIME-encapsulated message.\r\n"
    for part in parts:
        body += b"\r\n--" + boundary.encode() + b"\r\n" + part
    body += b"\r\n--" + boundary.encode() + b"--\r\n"

    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: {sender}",
        f"Subject: {_subject(actions)}",
        f"Date: {_date(date)}",
        f"Message-ID: <{_date(date, compact=True)}.{_safe(queue_id)}.{token}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 §5: no auto-replies to this one
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
    ]
    if is_8bit(body):
        headers.append("Content-Transfer-Encoding: 8bit")
    return "\r\n".join(headers).encode() + b"\r\n\r\n" + body


def is_8bit(data: bytes) -> bool:
    """True if ``data`` needs BODY=8BITMIME (a byte above 127)."""
    return not data.isascii()


def needs_smtputf8(dsn: bytes, recipient: str) -> bool:
    """True if a DSN must be sent with SMTPUTF8 to ``recipient``: the address or the
    DSN's own header section is not ASCII (RFC 6531 §3.4, RFC 6532 §3).  UTF-8 in
    its parts (the global types of RFC 6533) needs only BODY=8BITMIME."""
    return not recipient.isascii() or not _header_section(dsn).isascii()


def decode_xtext(text: str) -> str:
    """RFC 3461 §4: ``+XX`` is the octet XX; the result is read as UTF-8 (RFC 6533)."""
    data = b""
    for i, piece in enumerate(_XTEXT_HEX.split(text)):
        data += bytes([int(piece, 16)]) if i % 2 else piece.encode()
    return data.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- parts


def _notification(
    reporting_mta: str,
    recipients: Sequence[RecipientReport],
    failed: bool,
    full: bool,
    ret: str | None,
    returned: Returned,
) -> bytes:
    """The human-readable part: what happened to whom, grouped by action, and what
    of the original comes back (and what of it was cut)."""
    paragraphs = [f"This is the mail system at host {reporting_mta}."]
    for action in Action:
        group = [r for r in recipients if r.action == action]
        if not group:
            continue
        paragraphs.append(_INTRODUCTIONS[action])
        paragraphs += [_explain(report) for report in group]
    if failed:
        if full:
            paragraphs.append("Your message is attached below the delivery report.")
        elif (ret or "").upper() == "FULL":
            paragraphs.append(
                f"Your message ({returned.size} bytes) is too large to return in full; "
                "its headers are attached below the delivery report."
            )
        else:
            paragraphs.append("The headers of your message are attached below the report.")
    if returned.headers_cut:
        paragraphs.append(
            f"The headers of your message are longer than {RETURN_HEADERS_LIMIT // 1024} KiB; "
            f"only their first {RETURN_HEADERS_LIMIT // 1024} KiB are attached."
        )
    if returned.lines_cut:
        paragraphs.append(
            f"{returned.lines_cut} line(s) of your message are longer than {MAX_LINE} octets "
            "(RFC 5322 section 2.1.1) and are cut short in the attached copy."
        )
    lines: list[str] = []
    for paragraph in paragraphs:
        lines += [*textwrap.wrap(paragraph, width=76, subsequent_indent="    "), ""]
    return "\r\n".join(lines).encode()


def _explain(report: RecipientReport) -> str:
    said = one_line(report.diagnostic or f"status {report.status}")
    host = report.remote_host or report.remote_mta
    if host:
        said = f"host {one_line(host)} said: {said}"
    return f"<{one_line(report.final_recipient)}>: {said}"


def _delivery_status(
    reporting_mta: str,
    queue_id: str,
    envid: str | None,
    arrival_date: datetime,
    recipients: Sequence[RecipientReport],
    retry_until: datetime | None,
) -> bytes:
    """RFC 3464 §2.2–2.3: the per-message block, then one block per recipient."""
    per_message = [("Reporting-MTA", f"dns; {reporting_mta}"), ("X-Backupmx-Queue-ID", queue_id)]
    if envid:
        per_message.append(("Original-Envelope-Id", decode_xtext(envid)))
    per_message.append(("Arrival-Date", _date(arrival_date)))
    blocks = [_fields(per_message)]
    for report in recipients:
        if not _STATUS.fullmatch(report.status):
            raise ValueError(f"{report.status!r} is not an RFC 3463 status")
        fields: list[tuple[str, str]] = []
        if report.original_recipient:
            addr_type, _, address = report.original_recipient.partition(";")
            addr_type, address = _typed_address(addr_type, decode_xtext(address))
            fields.append(("Original-Recipient", f"{addr_type};{address}"))
        final_type, final = _typed_address("rfc822", report.final_recipient)
        fields += [
            ("Final-Recipient", f"{final_type}; {final}"),
            ("Action", str(report.action)),
            ("Status", report.status),
        ]
        if report.remote_mta:
            fields.append(("Remote-MTA", f"dns; {report.remote_mta}"))
        if report.diagnostic:
            kind = report.diagnostic_type or (
                "smtp" if _SMTP_REPLY.match(report.diagnostic) else "X-Backupmx"
            )
            fields.append(("Diagnostic-Code", f"{kind}; {one_line(report.diagnostic)}"))
        if report.last_attempt_date:
            fields.append(("Last-Attempt-Date", _date(report.last_attempt_date)))
        until = report.will_retry_until or retry_until
        if report.action == Action.DELAYED and until:
            fields.append(("Will-Retry-Until", _date(until)))
        blocks.append(_fields(fields))
    return b"\r\n".join(blocks)


def _typed_address(addr_type: str, address: str) -> tuple[str, str]:
    """RFC 3464 §2.3.1 address-type and address.  A non-ASCII address is RFC 6533's
    ``utf-8`` type as utf-8-addr-unitext (§3): UTF-8 as it is, and the ASCII that
    is not QCHAR as ``\\x{HH}``.  An ORCPT given as ``utf-8`` is already that form."""
    addr_type = addr_type.strip()
    if addr_type.lower() == "utf-8":
        return "utf-8", address
    if address.isascii():
        return addr_type, address
    return "utf-8", _NOT_QCHAR.sub(lambda m: f"\\x{{{ord(m.group()):X}}}", address)


def _fields(fields: Iterable[tuple[str, str]]) -> bytes:
    """One block of ``Name: value`` lines, folded at spaces, each ending in CRLF."""
    out = b""
    for name, value in fields:
        out += _fold(f"{name}: {one_line(value)}").encode() + b"\r\n"
    return out


def _part(headers: list[str], content: bytes) -> bytes:
    if is_8bit(content):
        headers = [*headers, "Content-Transfer-Encoding: 8bit"]
    content = content if content.endswith(b"\r\n") or not content else content + b"\r\n"
    return "\r\n".join(headers).encode() + b"\r\n\r\n" + content


# --------------------------------------------------------------------------- helpers


def _subject(actions: set[Action]) -> str:
    if Action.FAILED in actions:
        return _SUBJECTS[Action.FAILED]
    if Action.DELAYED in actions:
        return _SUBJECTS[Action.DELAYED]
    return _SUBJECTS[Action.DELIVERED]


def _date(moment: datetime, compact: bool = False) -> str:
    """RFC 5322 date (naive datetimes are taken as UTC); compact: for Message-ID."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S") if compact else format_datetime(moment)


def _crlf(data: bytes) -> bytes:
    """Every line ending (CRLF, bare CR, bare LF) as CRLF, and a final CRLF."""
    data = _LINE_END.sub(b"\r\n", data)
    return data if data.endswith(b"\r\n") or not data else data + b"\r\n"


def _header_section(message: bytes) -> bytes:
    """The header lines of a CRLF-normalised ``message``, without the blank line."""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


@dataclass(frozen=True)
class Returned:
    """What of the original goes into the DSN, and what was cut to get there."""

    content: bytes
    size: int  # of the whole original
    headers_cut: bool = False  # the header section was longer than RETURN_HEADERS_LIMIT
    lines_cut: int = 0  # lines cut at MAX_LINE octets


def _returned(original: bytes, full: bool) -> Returned:
    """The whole CRLF-normalised ``original`` (``full``) or its header section,
    bounded: headers to `RETURN_HEADERS_LIMIT`, every line to `MAX_LINE`."""
    headers = _header_section(original)
    kept: list[bytes] = []
    size = cut = 0
    headers_cut = False
    for line in _lines(headers):
        # Each line is cut to the limit before it is folded, so that a header line of
        # many megabytes costs no more work than one of 64 KiB.
        folded, cut_here = _fold_header_line(line[:RETURN_HEADERS_LIMIT])
        cut += cut_here
        for piece in folded:
            size += len(piece) + 2
            if size > RETURN_HEADERS_LIMIT:
                headers_cut = True
                break
            kept.append(piece)
        if headers_cut:
            break
    if full:
        for line in _lines(original[len(headers) :]):
            cut += len(line) > MAX_LINE
            kept.append(_cut(line, MAX_LINE))
    content = b"".join(line + b"\r\n" for line in kept)
    return Returned(content, len(original), headers_cut, cut)


def _lines(data: bytes) -> Iterator[bytes]:
    """The lines of CRLF-ended ``data`` without their CRLF, one at a time."""
    start = 0
    while start < len(data):
        end = data.find(b"\r\n", start)
        end = len(data) if end < 0 else end
        yield data[start:end]
        start = end + 2


def _fold_header_line(line: bytes) -> tuple[list[bytes], bool]:
    """``line`` as lines of at most `MAX_LINE` octets: folded before a space or tab
    that follows some text (RFC 5322 §2.2.3: unfolding restores it); where there
    is none in reach, cut there and resumed at the next space.  Returns the lines
    and whether anything was cut."""
    out: list[bytes] = []
    cut = False
    while len(line) > MAX_LINE:
        at = max(line.rfind(b" ", 1, MAX_LINE + 1), line.rfind(b"\t", 1, MAX_LINE + 1))
        if at > 0 and line[:at].strip(b" \t"):
            out.append(line[:at])
            line = line[at:]
            continue
        cut = True
        out.append(_cut(line, MAX_LINE))
        space = _WSP.search(line, MAX_LINE)
        line = line[space.start() :] if space else b""
    if line.strip(b" \t") or not cut:
        out.append(line)
    return out, cut


def _cut(line: bytes, limit: int) -> bytes:
    """At most ``limit`` octets of ``line``, not ending inside a UTF-8 sequence."""
    if len(line) <= limit:
        return line
    end = limit
    while end > 0 and 0x80 <= line[end] <= 0xBF:
        end -= 1
    return line[:end]


def _boundary(base: str, content: bytes) -> str:
    """A boundary (RFC 2046 bchars, at most 70) that does not occur in ``content``."""
    base = re.sub(r"[^0-9A-Za-z'()+_,\-./:=?]", "_", base)[:60]
    candidate, n = base, 0
    while b"--" + candidate.encode() in content:
        n += 1
        candidate = f"{base}={n}"
    return candidate


def _safe(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z.-]", "_", text)


def _charset(content: bytes) -> str:
    return "us-ascii" if content.isascii() else "utf-8"


def _check_header_value(value: str) -> None:
    if not value or re.search(r"[\r\n]", value):
        raise ValueError(f"{value!r} cannot be used in a header")


def _fold(line: str, width: int = 78) -> str:
    """RFC 5322 §2.2.3: break at spaces to stay under ``width`` where possible.

    A word longer than `_LONGEST_WORD` octets is cut, so that no line reaches the
    hard limit of `MAX_LINE` octets, UTF-8 included (a folded-in space in a
    diagnostic text is harmless).
    """
    if len(line) <= width:
        return line
    words = [piece for word in line.split(" ") for piece in _pieces(word, _LONGEST_WORD)]
    lines: list[str] = []
    current = words[0]
    for word in words[1:]:
        if len(current) + 1 + len(word) > width and current.strip():
            lines.append(current)
            current = " " + word
        else:
            current += " " + word
    lines.append(current)
    return "\r\n".join(lines)


def _pieces(word: str, limit: int) -> list[str]:
    """``word`` in pieces of at most ``limit`` octets of UTF-8 each."""
    pieces, current, size = [], "", 0
    for char in word:
        octets = len(char.encode())
        if size + octets > limit:
            pieces.append(current)
            current, size = "", 0
        current += char
        size += octets
    return [*pieces, current]
