"""The queue's tables: one row per message, one per body, one per recipient, and
each recipient's last delivery attempts.

A message whose recipients are all final is *finished*: its body is deleted in
the transaction that records the last result, and its row and recipients stay,
as a record of what happened, for ``[queue] keep_finished`` (`backupmx.queue.retention`).
The body has a table of its own so that it takes its pages with it: a 10 KiB
row keeps part of itself on its B-tree leaf page, which emptying the column in
place would leave almost empty for as long as the record is kept.

The alembic migration in ``alembic/versions`` creates exactly these tables; a
test compares the two so that they cannot drift.  Times are stored as UTC and
always come back timezone-aware.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    false,
    text,
)
from sqlalchemy.engine import Dialect


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is stored as UTC and read back timezone-aware on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
        return value.astimezone(UTC)  # type: ignore[no-any-return]


metadata = MetaData()

messages = Table(
    "messages",
    metadata,
    Column("id", String(32), primary_key=True),  # the queue id shown to clients
    Column("sender", Text, nullable=False),  # "" for the null sender <>
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
    Column("client_ip", String(64), nullable=False),
    Column("client_helo", Text, nullable=False),
    Column("protocol", String(16), nullable=False),  # ESMTP, ESMTPS, UTF8SMTP, …
    Column("tls", Text),  # "TLSv1.3 TLS_AES_256_GCM_SHA384" or NULL
    Column("body_type", String(16), nullable=False),  # 7BIT or 8BITMIME
    Column("smtputf8", Boolean, nullable=False),
    Column("dsn_ret", String(8)),  # RFC 3461 RET: FULL or HDRS
    Column("dsn_envid", Text),  # RFC 3461 ENVID, as sent
    Column("session_id", String(32), nullable=False),
    # The spam check's verdict (accept, tag, skipped, error) and score, if one ran.
    Column("spam_verdict", String(16)),
    Column("spam_score", Float),
    Column("spam_detail", Text),  # "spamd: GTUBE,NO_RELAYS" — the backend and its rules
    Column("finished_at", UTCDateTime),  # when its last recipient became final; NULL while pending
    # Every pending recipient has had its delay warning (recipients.delay_warned).
    Column("delay_warned", Boolean, nullable=False, server_default=text("false")),
)
# Our Received: + the message as received, while the message is pending.
bodies = Table(
    "bodies",
    metadata,
    Column(
        "message_id",
        String(32),
        ForeignKey("messages.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("body", LargeBinary, nullable=False),
)


def _partial(name: str, column: Column[Any], where: Any) -> Index:
    """An index of the rows that match `where`, on both backends."""
    return Index(name, column, sqlite_where=where, postgresql_where=where)


# The sweeps (expiry, delay warnings) walk pending messages by age: partial indexes,
# so that finished records kept for `keep_finished` cost them nothing.
_pending = messages.c.finished_at.is_(None)
_partial("ix_messages_pending", messages.c.received_at, _pending)
_partial(
    "ix_messages_unwarned", messages.c.received_at, _pending & (messages.c.delay_warned == false())
)
# The retention sweep; partial, so that no planner takes it for "finished_at IS NULL".
_partial("ix_messages_finished", messages.c.finished_at, messages.c.finished_at.is_not(None))

recipients = Table(
    "recipients",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column(
        "message_id",
        String(32),
        ForeignKey("messages.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("address", Text, nullable=False),
    Column("domain", Text, nullable=False),  # lower-case A-label form, for routing
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("last_error", Text),
    # The node sending a ``sending`` row (`backupmx.queue.nodes`): the lease lasts as
    # long as that node's heartbeat, and ``attempts`` (raised by each claim) tells one
    # claim from the next, so a node that lost the row cannot record a result for it.
    Column("lease_owner", String(64)),
    Column("lease_until", UTCDateTime),  # unused since schema 0006 (leases follow the node)
    Column("dsn_notify", String(32)),  # RFC 3461 NOTIFY
    Column("dsn_orcpt", Text),  # RFC 3461 ORCPT, as sent
    Column("updated_at", UTCDateTime, nullable=False),
    Column("delay_warned", Boolean, nullable=False, server_default=false()),  # delay DSN sent
    # Due mail is found per domain (`Claims.claim` skips a down domain's mail without
    # reading it); the same index answers "does this domain have pending mail".
    Index("ix_recipients_due", "state", "domain", "next_attempt_at"),
    Index("ix_recipients_owner", "state", "lease_owner"),
    Index("ix_recipients_message", "message_id"),
    # Finished deliveries feed the recipient-verification cache (Store.learn_recipients).
    Index("ix_recipients_finished", "state", "updated_at"),
)

# Each recipient's last delivery attempts, for `queue show` (`backupmx.queue.attempts`):
# written with the result, at most `KEPT_ATTEMPTS` per recipient, and gone with the
# recipient.  Without rowid on SQLite: the rows live in primary-key order, so a
# recipient's history is one short range to read, append to and trim.
delivery_attempts = Table(
    "delivery_attempts",
    metadata,
    Column(
        "recipient_id",
        BigInteger,
        ForeignKey("recipients.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("number", Integer, primary_key=True),  # the claim's `recipients.attempts`
    Column("at", UTCDateTime, nullable=False),
    Column("host", Text),  # "mx.example.net[192.0.2.1]:25"; NULL: no host answered
    Column("outcome", String(16), nullable=False),  # delivered, deferred, bounced, held
    Column("reply", Text),  # the host's reply, or why there was none
    sqlite_with_rowid=False,
)

# What the deliverer knows of each destination domain, for `backupmx domains` and
# the metrics: written by the node that probes or delivers, read by everyone.
domains = Table(
    "domains",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("state", String(16), nullable=False),  # up, down, unknown
    Column("since", UTCDateTime, nullable=False),  # when it entered that state
    Column("route", Text),  # the hops in use, "host[addr]:port, ..."
    Column("reason", Text),  # why mail waits: "no MX better than this host", last error
    Column("last_probe_at", UTCDateTime),
    Column("last_probe_result", Text),
    Column("updated_at", UTCDateTime, nullable=False),
)

# The nodes sharing this queue (`backupmx.queue.nodes`): each `serve` process writes
# its row every heartbeat; a node whose ``last_seen`` is older than the lease is dead,
# and any live node gives its ``sending`` recipients back to the queue.
nodes = Table(
    "nodes",
    metadata,
    Column("name", String(64), primary_key=True),  # the lease owner name
    Column("hostname", Text, nullable=False),  # the machine's name
    Column("version", String(32), nullable=False),
    Column("listen", Text, nullable=False),  # "127.0.0.1:25, [::1]:25"
    Column("pid", Integer, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("last_seen", UTCDateTime, nullable=False),
    Column("in_flight", Integer, nullable=False, server_default=text("0")),  # recipients
    Column("delivered", BigInteger, nullable=False, server_default=text("0")),  # since start
    Column("delivery_rate", Float, nullable=False, server_default=text("0")),  # msg/s, last minute
    Column("stopped_at", UTCDateTime),  # a clean stop; NULL while running or after a crash
)

# Each node's own view of each domain's primary: the shared ``domains.state`` is up
# while any live node reaches the primary, and down only when every live node that
# tried failed (`backupmx.queue.domains`), so one node with a broken network neither
# makes the state flap nor keeps the others from delivering.
primary_views = Table(
    "primary_views",
    metadata,
    Column("domain", String(255), primary_key=True),
    Column("node", String(64), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("since", UTCDateTime, nullable=False),
    Column("reason", Text),
    Column("updated_at", UTCDateTime, nullable=False),
)

# The recipient-verification cache (Postfix's verify(8) database): what the primary
# said of an address, from a callout or from a delivery, until `expires_at`.
recipient_verdicts = Table(
    "recipient_verdicts",
    metadata,
    Column("address", String(320), primary_key=True),  # local part as sent, @, A-label domain
    Column("valid", Boolean, nullable=False),
    Column("reply", Text),  # the primary's answer, "550 5.1.1 <x@y>: unknown user"
    Column("source", String(16), nullable=False),  # callout or delivery
    Column("checked_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Index("ix_recipient_verdicts_expires", "expires_at"),
)

# Greylisting triplets: client network (/24 or /64), envelope sender, recipient.
greylist = Table(
    "greylist",
    metadata,
    Column("client_net", String(64), primary_key=True),
    Column("sender", String(320), primary_key=True),
    Column("recipient", String(320), primary_key=True),
    Column("first_seen", UTCDateTime, nullable=False),
    Column("last_seen", UTCDateTime, nullable=False),
    Column("passed_at", UTCDateTime),  # NULL while the triplet waits out its delay
    Index("ix_greylist_last_seen", "last_seen"),
)
