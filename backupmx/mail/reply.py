"""What a primary's reply means for a recipient: pure classification.

* ``2xx`` → delivered.
* ``4xx`` → deferred: back to the queue with backoff.
* ``5xx`` → bounced, unless the domain asks to *hold* 5xx answers that come
  within ``hold_window`` after an outage (a primary back with a broken config
  must not make the backup bounce everything it held).

`Outcome.status` is the enhanced status code for the DSN: the one in the reply
when there is one (RFC 3463), otherwise derived from the reply class.

`Outcome.text` is one line the queue keeps as it is: aiosmtplib decodes a
reply with ``surrogateescape``, and a primary's NUL, control characters or
undecodable bytes in `last_error` would fail the whole group commit of
delivery results (PostgreSQL's text holds no NUL, neither driver encodes a
lone surrogate).  Controls become spaces, undecodable bytes U+FFFD.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_UNDECODABLE = re.compile(r"[\ud800-\udfff]")


class Verdict(StrEnum):
    """What a reply means for the recipient.  Each verdict is applied as one event of
    the recipient table (``queue/state.py``'s `VERDICT_EVENTS`); the values name the
    state it leads to, except ``deferred`` (back to ``queued``), and are the metrics'
    ``result`` label and the ``message_…`` and ``recipient_…`` log events."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    HELD = "held"


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    code: int
    status: str  # RFC 3463 enhanced status, e.g. "5.1.1"
    text: str  # one line for last_error and the DSN's Diagnostic-Code

    @property
    def diagnostic(self) -> str:
        return f"{self.code} {self.text}" if self.code else self.text


def enhanced_status(code: int, message: str) -> str:
    match = _ENHANCED.match(message)
    if match and match.group(1) == str(code)[0]:
        return ".".join(match.groups())
    return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "4.0.0")


def classify(code: int, message: str, *, hold_5xx: bool = False) -> Outcome:
    """Classify an SMTP reply to MAIL, RCPT or DATA."""
    text = one_line(message)
    status = enhanced_status(code, text)
    if 200 <= code < 300:
        verdict = Verdict.DELIVERED
    elif 500 <= code < 600:
        verdict = Verdict.HELD if hold_5xx else Verdict.BOUNCED
    else:
        verdict = Verdict.DEFERRED
    return Outcome(verdict, code, status, text)


def deferred(reason: str, status: str = "4.4.1") -> Outcome:
    """A failure with no SMTP reply: connection refused, timeout, DNS trouble."""
    return Outcome(Verdict.DEFERRED, 0, status, one_line(reason))


def bounced(reason: str, status: str) -> Outcome:
    """A permanent failure decided without a reply: null MX, NXDOMAIN, SMTPUTF8 needed."""
    return Outcome(Verdict.BOUNCED, 0, status, one_line(reason))


def one_line(text: str) -> str:
    """`text` as one line of single spaces without controls or undecodable bytes: a
    multi-line reply for `last_error`, and every value a DSN quotes."""
    return " ".join(_CONTROL.sub(" ", _UNDECODABLE.sub("\ufffd", text)).split())


@dataclass(frozen=True)
class CalloutAnswer:
    """A primary's answer to a recipient callout (RCPT without DATA)."""

    code: int  # the primary's reply to RCPT; 0 when no primary answered
    text: str
