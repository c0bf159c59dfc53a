"""Our one header: the RFC 5321 §4.4 ``Received:`` trace field, prepended to every message.

Protocol names follow RFC 3848 and RFC 6531 (ESMTP, ESMTPS, UTF8SMTP, UTF8SMTPS).
``for <rcpt>`` is written only for a single recipient, as Postfix does, so that
one message does not reveal its other recipients.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass(frozen=True)
class TraceFacts:
    helo: str
    client_ip: str
    hostname: str
    protocol: str
    queue_id: str
    tls: str | None  # "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"
    single_recipient: str | None
    date: datetime


def protocol_name(extended: bool, tls: bool, smtputf8: bool) -> str:
    base = "UTF8SMTP" if smtputf8 else "ESMTP" if extended else "SMTP"
    return base + ("S" if tls else "")


def _clean(text: str) -> str:
    """Keep the HELO argument readable without letting it break the header."""
    return re.sub(r"[^\x21-\x7e]", "?", text)[:255] or "unknown"


def rfc5322_date(moment: datetime) -> str:
    """RFC 5322 §3.3 date in UTC; email.utils.format_datetime costs five times more."""
    t = moment.astimezone(UTC)
    return (
        f"{_DAYS[t.weekday()]}, {t.day:02d} {_MONTHS[t.month - 1]} {t.year} "
        f"{t.hour:02d}:{t.minute:02d}:{t.second:02d} +0000"
    )


def received_header(facts: TraceFacts) -> bytes:
    client = f"IPv6:{facts.client_ip}" if ":" in facts.client_ip else facts.client_ip
    lines = [
        f"Received: from {_clean(facts.helo)} ([{client}])",
        f"\tby {facts.hostname} (backupmx) with {facts.protocol} id {facts.queue_id}",
    ]
    if facts.tls:
        lines.append(f"\t(using {facts.tls})")
    when = rfc5322_date(facts.date)
    if facts.single_recipient:
        lines.append(f"\tfor <{facts.single_recipient}>; {when}")
    else:
        lines[-1] += f"; {when}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")
