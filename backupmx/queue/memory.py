"""Receive-side memory: what the receiver remembers between connections.

* The recipient-verification cache (Postfix's verify(8) database): what the
  primary said of an address, from a callout or from a delivery, until it
  expires.  `learn_recipients` feeds it from finished deliveries.
* Greylisting triplets and when each was seen and passed (the policy that
  decides is the receive stage's, handed in as a function).
* The spam check's verdict on a queued message.

The receive stage decides what these mean (`backupmx.receive.recipients`,
`backupmx.receive.greylist`); this file only reads and writes them.  Writes are
upserts, so two sessions learning the same fact at once do not fail.  On a
database error the caller gets the exception; the receiver fails open (these
are filters, not reasons to refuse mail).  `prune_protection` drops what can no
longer matter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, delete, or_, select
from sqlalchemy.dialects import postgresql, sqlite

from backupmx.queue.database import QueueDatabase
from backupmx.queue.models import greylist, messages, recipient_verdicts, recipients
from backupmx.queue.records import (
    GreylistEntry,
    RecipientVerdict,
    SpamRecord,
    Triplet,
    UnknownMessage,
    utcnow,
)
from backupmx.queue.state import State


class Memory(QueueDatabase):
    async def recipient_verdict(
        self, address: str, now: datetime | None = None
    ) -> RecipientVerdict | None:
        """The cached verdict on `address`, unless it has expired."""
        query = select(recipient_verdicts).where(
            recipient_verdicts.c.address == address,
            recipient_verdicts.c.expires_at > (now or utcnow()),
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        return RecipientVerdict(
            row.address, row.valid, row.reply, row.source, row.checked_at, row.expires_at
        )

    async def remember_recipients(self, verdicts: Sequence[RecipientVerdict]) -> None:
        """Insert or replace cached verdicts (one transaction)."""
        if not verdicts:
            return
        rows = [
            {
                "address": v.address, "valid": v.valid, "reply": v.reply, "source": v.source,
                "checked_at": v.checked_at, "expires_at": v.expires_at,
            }
            for v in verdicts
        ]  # fmt: skip
        async with self.engine.begin() as conn:
            await conn.execute(self._upsert(recipient_verdicts, ["address"], rows[0]), rows)

    async def learn_recipients(
        self,
        since: datetime,
        positive_ttl: timedelta,
        negative_ttl: timedelta,
        now: datetime | None = None,
    ) -> int:
        """Feed the verification cache from deliveries finished in (since, now]: a
        delivered recipient exists; one the primary bounced with 5.1.x does not.  Other
        5xx (too big, policy) say nothing about the mailbox and are left out, and so are
        held 5xx answers (a primary that came back misconfigured)."""
        now = now or utcnow()
        query = select(
            recipients.c.address, recipients.c.domain, recipients.c.state, recipients.c.last_error
        ).where(
            recipients.c.updated_at > since,
            recipients.c.updated_at <= now,
            or_(
                recipients.c.state == State.DELIVERED.value,
                (recipients.c.state == State.BOUNCED.value)
                & recipients.c.last_error.like("5__ 5.1.%"),
            ),
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        latest: dict[str, RecipientVerdict] = {}
        for row in rows:
            valid = row.state == State.DELIVERED.value
            address = f"{row.address.rpartition('@')[0]}@{row.domain}"
            latest[address] = RecipientVerdict(
                address,
                valid,
                None if valid else row.last_error,
                "delivery",
                now,
                now + (positive_ttl if valid else negative_ttl),
            )
        await self.remember_recipients(list(latest.values()))
        return len(latest)

    async def greylist(
        self,
        triplet: Triplet,
        decide: Callable[[GreylistEntry | None], tuple[GreylistEntry, float]],
    ) -> float:
        """Read the triplet's entry, let `decide` (the receive stage's policy) say what
        it becomes and how long the triplet must still wait, and write the entry if it
        changed, all in one transaction; return the wait (0.0: it passes)."""
        key = (
            (greylist.c.client_net == triplet.client_net)
            & (greylist.c.sender == triplet.sender)
            & (greylist.c.recipient == triplet.recipient)
        )
        async with self.engine.begin() as conn:
            row = (await conn.execute(select(greylist).where(key))).first()
            entry = (
                None if row is None else GreylistEntry(row.first_seen, row.last_seen, row.passed_at)
            )
            decided, wait = decide(entry)
            if decided != entry:
                values = {**asdict(triplet), **asdict(decided)}
                await conn.execute(
                    self._upsert(greylist, ["client_net", "sender", "recipient"], values), values
                )
        return wait

    async def prune_protection(self, greylist_before: datetime, now: datetime | None = None) -> int:
        """Drop expired verification verdicts and greylist triplets last seen before
        `greylist_before`; return how many rows went."""
        now = now or utcnow()
        async with self.engine.begin() as conn:
            verdicts = await conn.execute(
                delete(recipient_verdicts).where(recipient_verdicts.c.expires_at <= now)
            )
            triplets = await conn.execute(
                delete(greylist).where(greylist.c.last_seen < greylist_before)
            )
        return int(verdicts.rowcount) + int(triplets.rowcount)

    async def spam_record(self, message_id: str) -> SpamRecord:
        query = select(
            messages.c.spam_verdict, messages.c.spam_score, messages.c.spam_detail
        ).where(messages.c.id == message_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            raise UnknownMessage([message_id])
        return SpamRecord(row.spam_verdict, row.spam_score, row.spam_detail)

    def _upsert(self, table: Table, keys: list[str], row: dict[str, Any]) -> Any:
        """INSERT … ON CONFLICT (keys) DO UPDATE, in this backend's dialect."""
        if self.dialect == "postgresql":
            on_postgresql = postgresql.insert(table)
            return on_postgresql.on_conflict_do_update(
                index_elements=keys,
                set_={name: on_postgresql.excluded[name] for name in row if name not in keys},
            )
        on_sqlite = sqlite.insert(table)
        return on_sqlite.on_conflict_do_update(
            index_elements=keys,
            set_={name: on_sqlite.excluded[name] for name in row if name not in keys},
        )
