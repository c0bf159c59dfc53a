"""The queue's records: what crosses the queue's boundary, as plain data.

Every stage and the CLI hold these and nothing else of the queue: a stage hands
the store a `NewMessage` or a `Result` and gets back a `Claim`, an `Outbound`, an
`Overdue`; the CLI, ``status`` and the metrics read `MessageView`, `Stats`,
`DomainState` and `NodeView`, and an operator's hold or delete answers `Acted`.
No I/O and no SQL here, so importing a record never pulls in a database driver.

Promises: records are immutable once built (except `NewMessage`, which the
receiver fills in before it commits); times are timezone-aware UTC, and
``to_json`` writes them as ``…Z`` (the JSON field names are a contract, see
docs/contracts.md).  Reading or flushing an unknown queue id raises
`UnknownMessage` naming it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from backupmx.queue.state import Event, PrimaryState, State


def new_queue_id() -> str:
    """20 hex digits: microseconds since the epoch, then 28 random bits (sorts by arrival)."""
    return f"{time.time_ns() // 1000:013X}{secrets.randbits(28):07X}"


def utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


class BodySource(Protocol):
    @property
    def size(self) -> int: ...

    def read(self) -> bytes: ...

    def portable(self) -> BodySource:
        """The same body in a form the intake process can read (picklable)."""
        ...


@dataclass(frozen=True)
class BytesBody:
    """A body already in memory (a DSN we generate)."""

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self) -> bytes:
        return self.data

    def portable(self) -> BytesBody:
        return self


@dataclass(frozen=True)
class OpenedFile:
    """A body in a file another process holds open, read through its /proc link."""

    path: str
    size: int

    def read(self) -> bytes:
        with open(self.path, "rb") as body:
            return body.read()

    def portable(self) -> OpenedFile:
        return self


@dataclass(frozen=True)
class NewRecipient:
    address: str
    domain: str
    notify: str | None = None
    orcpt: str | None = None


@dataclass
class NewMessage:
    id: str
    sender: str
    recipients: list[NewRecipient]
    body: BodySource
    client_ip: str
    client_helo: str
    protocol: str
    session_id: str
    tls: str | None = None
    body_type: str = "7BIT"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    received_at: datetime = field(default_factory=utcnow)
    spam_verdict: str | None = None  # the spam check's action, if one ran
    spam_score: float | None = None
    spam_detail: str | None = None

    @property
    def size(self) -> int:
        return self.body.size


# ---------------------------------------------------------------------- delivery


@dataclass(frozen=True)
class Claim:
    recipient_id: int
    message_id: str
    address: str
    domain: str
    attempts: int
    notify: str | None
    orcpt: str | None


@dataclass(frozen=True)
class Outbound:
    """A queued message as the deliverer sends it."""

    id: str
    sender: str
    body: bytes | None  # None: a large body, read only when it is sent (`Claims.outbound`)
    size: int
    body_type: str
    smtputf8: bool
    ret: str | None
    envid: str | None
    received_at: datetime

    def loaded_body(self) -> bytes:
        """The body, once read: a large one is read just before it is sent, or quoted."""
        if self.body is None:
            raise ValueError(f"the body of {self.id} was not read")
        return self.body


@dataclass(frozen=True)
class Overdue:
    """A pending recipient past a deadline (expiry or delay warning), with its envelope."""

    recipient_id: int
    address: str
    notify: str | None
    orcpt: str | None
    last_error: str | None
    message: Outbound


@dataclass(frozen=True)
class Result:
    recipient_id: int
    event: Event  # SUCCESS, TEMPFAIL or PERMFAIL
    error: str | None = None
    next_attempt_at: datetime | None = None  # for TEMPFAIL
    # The claim this result is for (its ``attempts``): a result for an earlier claim of
    # the same recipient, by this node or another, is not applied.  None: any claim the
    # reporting node holds (callers that never lose a lease, such as the tests' own).
    claim_attempts: int | None = None
    # For the recipient's attempt history (`backupmx.queue.attempts`): the host that
    # answered ("mx.example.net[192.0.2.1]:25"; None: no connection was made) and its
    # reply, a delivery's 250 included (None: `error` says what happened).
    host: str | None = None
    reply: str | None = None


@dataclass(frozen=True)
class DomainState:
    name: str
    state: PrimaryState
    since: datetime
    route: str | None
    reason: str | None
    last_probe_at: datetime | None
    last_probe_result: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.name,
            "state": self.state,
            "since": _iso(self.since),
            "route": self.route,
            "reason": self.reason,
            "last_probe_at": _iso(self.last_probe_at) if self.last_probe_at else None,
            "last_probe_result": self.last_probe_result,
        }


# ---------------------------------------------------------------------- receive-side memory


@dataclass(frozen=True)
class RecipientVerdict:
    """What the primary said of an address (the recipient-verification cache)."""

    address: str  # local part as sent, "@", the A-label domain
    valid: bool
    reply: str | None
    source: str  # "callout" or "delivery"
    checked_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class Triplet:
    """The greylisting key: client network (/24 or /64), envelope sender, recipient."""

    client_net: str
    sender: str
    recipient: str


@dataclass(frozen=True)
class GreylistEntry:
    """What the queue remembers of a triplet (the receive stage decides what it means)."""

    first_seen: datetime
    last_seen: datetime
    passed_at: datetime | None  # None while the triplet waits out its delay


@dataclass(frozen=True)
class SpamRecord:
    verdict: str | None
    score: float | None
    detail: str | None

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "score": self.score, "detail": self.detail}


# ---------------------------------------------------------------------- views for people


@dataclass(frozen=True)
class RecipientView:
    id: int
    address: str
    domain: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    notify: str | None
    orcpt: str | None
    lease_owner: str | None = None  # the node sending it, while it is `sending`

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "domain": self.domain,
            "state": self.state,
            "attempts": self.attempts,
            "next_attempt_at": _iso(self.next_attempt_at),
            "last_error": self.last_error,
            "notify": self.notify,
            "orcpt": self.orcpt,
            "lease_owner": self.lease_owner,
        }


@dataclass(frozen=True)
class AttemptView:
    """One delivery attempt of a recipient, as kept (`backupmx.queue.attempts`)."""

    number: int  # the recipient's attempt count when it was made: 1, 2, …
    at: datetime
    host: str | None  # the host that answered; None when no connection was made
    outcome: str  # delivered, deferred, bounced, held
    reply: str | None  # its reply, or why there was none (connection refused, …)

    def to_json(self) -> dict[str, Any]:
        return {
            "attempt": self.number,
            "at": _iso(self.at),
            "host": self.host,
            "outcome": self.outcome,
            "reply": self.reply,
        }


@dataclass(frozen=True)
class History:
    """A recipient's last attempts, oldest first, and how many earlier ones are not kept."""

    attempts: list[AttemptView]
    not_kept: int

    def to_json(self) -> dict[str, Any]:
        return {
            "attempts_history": [a.to_json() for a in self.attempts],
            "attempts_not_kept": self.not_kept,
        }


@dataclass(frozen=True)
class MessageView:
    id: str
    sender: str
    size: int
    sha256: str
    received_at: datetime
    client_ip: str
    client_helo: str
    protocol: str
    tls: str | None
    body_type: str
    smtputf8: bool
    ret: str | None
    envid: str | None
    recipients: list[RecipientView]
    finished_at: datetime | None = None  # all recipients final; the body is gone

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sender": self.sender,
            "size": self.size,
            "sha256": self.sha256,
            "received_at": _iso(self.received_at),
            "client_ip": self.client_ip,
            "client_helo": self.client_helo,
            "protocol": self.protocol,
            "tls": self.tls,
            "body_type": self.body_type,
            "smtputf8": self.smtputf8,
            "ret": self.ret,
            "envid": self.envid,
            "recipients": [r.to_json() for r in self.recipients],
            "finished_at": _iso(self.finished_at) if self.finished_at else None,
        }


@dataclass(frozen=True)
class ShapeRow:
    """Pending mail of one domain by age (`backupmx.queue.shape`): ``buckets[i]`` counts
    what is younger than the i-th bound asked for and not younger than the one before;
    the last bucket what is older than every bound."""

    domain: str  # lower case; "" for the null sender's messages
    buckets: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.buckets)

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.domain, "total": self.total, "buckets": list(self.buckets)}


@dataclass(frozen=True)
class DomainStats:
    domain: str
    counts: dict[str, int]
    oldest: datetime | None


def waiting(counts: dict[str, int]) -> int:
    """Recipients still to be sent (queued, or being sent now), from per-state counts."""
    return counts.get(State.QUEUED.value, 0) + counts.get(State.SENDING.value, 0)


@dataclass(frozen=True)
class Stats:
    messages: int  # messages with at least one pending recipient
    recipients: dict[str, int]  # per state, every state present
    oldest: datetime | None
    domains: list[DomainStats]

    def to_json(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "recipients": self.recipients,
            "oldest_received_at": _iso(self.oldest) if self.oldest else None,
            "domains": [
                {
                    "domain": d.domain,
                    "recipients": d.counts,
                    "oldest_received_at": _iso(d.oldest) if d.oldest else None,
                }
                for d in self.domains
            ],
        }


class NodeState(StrEnum):
    """A node's liveness, from its row in ``nodes``: *live* while its heartbeat is
    younger than the lease, *stopped* after a clean stop, *dead* otherwise (it crashed,
    or lost the database, and a live node gives its recipients back to the queue)."""

    LIVE = "live"
    DEAD = "dead"
    STOPPED = "stopped"


@dataclass(frozen=True)
class NodeView:
    """One ``serve`` process sharing the queue, as its heartbeat row and the queue see it."""

    name: str  # the lease owner name
    hostname: str
    version: str
    listen: str  # "127.0.0.1:25, [::1]:25"
    pid: int
    started_at: datetime
    last_seen: datetime
    heartbeat_age: float  # seconds since last_seen, by the database's clock
    stopped_at: datetime | None
    state: NodeState
    in_flight: int  # its `sending` recipients in the queue: the truth
    reported_in_flight: int  # what the node itself said at its last heartbeat
    delivered: int  # since it started
    delivery_rate: float  # messages per second, as it last reported

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "hostname": self.hostname,
            "version": self.version,
            "listen": [a.strip() for a in self.listen.split(",") if a.strip()],
            "pid": self.pid,
            "started_at": _iso(self.started_at),
            "last_seen": _iso(self.last_seen),
            "heartbeat_age_seconds": round(self.heartbeat_age, 1),
            "state": self.state,
            "stopped_at": _iso(self.stopped_at) if self.stopped_at else None,
            "in_flight": self.in_flight,
            "reported_in_flight": self.reported_in_flight,
            "delivered": self.delivered,
            "delivery_rate": self.delivery_rate,
        }


def node_state(heartbeat_age: float, stopped_at: datetime | None, lease: float) -> NodeState:
    """Live while the last heartbeat is at most `lease` seconds old, unless it stopped."""
    if stopped_at is not None:
        return NodeState.STOPPED
    return NodeState.LIVE if heartbeat_age <= lease else NodeState.DEAD


@dataclass(frozen=True)
class InFlight:
    """A recipient an operator's action left alone: a node is sending it now."""

    message_id: str
    recipient: str
    lease_owner: str | None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.message_id, "recipient": self.recipient, "lease_owner": self.lease_owner}


@dataclass(frozen=True)
class Acted:
    """What an operator's hold or delete did: `changed` recipients held (removed),
    the recipients being sent that it did not touch, and for a delete the messages
    it removed whole (their last recipient removed)."""

    changed: int
    in_flight: list[InFlight]
    deleted: int = 0


class UnknownMessage(LookupError):
    def __init__(self, ids: Iterable[str]) -> None:
        self.ids = sorted(ids)
        super().__init__(f"no such message: {', '.join(self.ids)}")
