"""Which recipients an operator's listing or action covers: `Selection`.

Filters select recipients, not messages, as ``exiqgrep`` and ``postsuper``
users expect of a per-recipient queue: ``queue hold --domain x.example.org``
holds the x.example.org recipients of a message and leaves its other
recipients alone.  A recipient is selected when its message matches every
message filter (sender, client, subject, age, size, ID) and the recipient
matches every recipient filter (domain, state, address); a message is listed,
or acted on, with its selected recipients only, and not at all when none is
selected.  By default only pending recipients (queued, sending, held) count;
`include_final` adds delivered, bounced and expired ones, and a `state` filter
names the one state wanted.

`narrow` is the whole definition, in plain Python over the queue's records.
The inventory (`backupmx.queue.inventory`) first narrows in SQL what it can
(states, domain, ages, size, IDs), so that a large queue is not read whole,
then asks `narrow` about each message it read.  Patterns are case-insensitive
globs (``*@example.net``; ``<>`` is the null sender) or Python regular
expressions searched anywhere in the text; subjects are decoded (RFC 2047)
from the stored headers, which are read only when a subject filter is given.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from email import policy
from email.parser import BytesHeaderParser

from backupmx.queue.records import MessageView, RecipientView
from backupmx.queue.state import PENDING, State

# The start of a stored body read for its Subject: our Received: line and the
# client's headers come first, and Postfix's header_size_limit is 100 KiB.
HEAD_BYTES = 100 * 1024


@dataclass(frozen=True)
class Selection:
    ids: tuple[str, ...] | None = None  # these messages only (unknown ones are the caller's)
    domain: str | None = None  # lower-case A-label
    state: str | None = None
    sender: str | None = None  # glob
    recipient: str | None = None  # glob
    sender_regex: re.Pattern[str] | None = None
    recipient_regex: re.Pattern[str] | None = None
    subject_regex: re.Pattern[str] | None = None
    client_regex: re.Pattern[str] | None = None  # the client's IP address or HELO name
    older_than: float | None = None  # seconds
    younger_than: float | None = None
    larger_than: int | None = None  # bytes
    include_final: bool = False

    @property
    def filtered(self) -> bool:
        """Some filter narrows the selection (IDs and the state scope aside)."""
        filters = (
            self.domain, self.state, self.sender, self.recipient, self.sender_regex,
            self.recipient_regex, self.subject_regex, self.client_regex, self.older_than,
            self.younger_than, self.larger_than,
        )  # fmt: skip
        return any(f is not None for f in filters)

    @property
    def states(self) -> list[str] | None:
        """The recipient states that count, or None for every state."""
        if self.state is not None:
            return [self.state]
        return None if self.include_final else sorted(PENDING)

    @property
    def only_pending(self) -> bool:
        """Only pending recipients count: every selected message is unfinished."""
        states = self.states
        return states is not None and all(State(s) in PENDING for s in states)

    @property
    def needs_subject(self) -> bool:
        return self.subject_regex is not None

    def received_before(self, now: datetime) -> datetime | None:
        return None if self.older_than is None else now - timedelta(seconds=self.older_than)

    def received_after(self, now: datetime) -> datetime | None:
        return None if self.younger_than is None else now - timedelta(seconds=self.younger_than)

    def narrow(self, m: MessageView, now: datetime, subject: str = "") -> MessageView | None:
        """`m` with its selected recipients only, or None when none is selected.
        `subject` is the decoded Subject, needed only with a subject filter."""
        if not self._wants_message(m, now, subject):
            return None
        chosen = [r for r in m.recipients if self._wants_recipient(r)]
        return replace(m, recipients=chosen) if chosen else None

    def _wants_message(self, m: MessageView, now: datetime, subject: str) -> bool:
        before, after = self.received_before(now), self.received_after(now)
        return (
            (self.ids is None or m.id in self.ids)
            and (before is None or m.received_at < before)
            and (after is None or m.received_at > after)
            and (self.larger_than is None or m.size > self.larger_than)
            and (self.sender is None or _like(m.sender, self.sender))
            and _found(self.sender_regex, m.sender)
            and _found(self.client_regex, m.client_ip, m.client_helo)
            and _found(self.subject_regex, subject)
        )

    def _wants_recipient(self, r: RecipientView) -> bool:
        states = self.states
        return (
            (states is None or r.state in states)
            and (self.domain is None or r.domain == self.domain)
            and (self.recipient is None or _like(r.address, self.recipient))
            and _found(self.recipient_regex, r.address)
        )


def pattern(text: str) -> re.Pattern[str]:
    """A filter's regular expression: Python syntax, case-insensitive (re.error if bad)."""
    return re.compile(text, re.IGNORECASE)


def _found(regex: re.Pattern[str] | None, *texts: str) -> bool:
    return regex is None or any(regex.search(text) for text in texts)


def _like(address: str, glob: str) -> bool:
    """Case-insensitive glob; "<>" (or "") is the null sender."""
    if glob in ("<>", ""):
        return address == ""
    return fnmatch.fnmatchcase(address.lower(), glob.lower())


def subject_of(head: bytes) -> str:
    """The decoded Subject of a message from the start of its stored body ("" if none)."""
    end = head.find(b"\r\n\r\n")
    parsed = BytesHeaderParser(policy=policy.default).parsebytes(
        head[: end if end >= 0 else len(head)] + b"\r\n\r\n"
    )
    return " ".join(str(parsed.get("subject", "")).split())
