"""Each recipient's delivery attempts: when, which host, what it answered — the last few.

``queue show`` lists them per recipient, as Exim's message log does, so that an
operator sees how a deferral came about, not only its last reason.

Promises:

* An attempt is written by `write`, in the results writer's transaction that
  applies its result (`backupmx.queue.results`), for the results its fence kept
  only: a result dropped as ``result_after_lease_lost`` leaves no attempt.  One
  bulk insert per batch, and one trimming delete for the recipients past
  `KEPT_ATTEMPTS`, so a flush pays two statements per group commit for it.
* At most `KEPT_ATTEMPTS` attempts per recipient are kept, the latest ones;
  ``recipients.attempts`` keeps the whole count, and `History.not_kept` says how
  many earlier ones are no longer known.
* The rows go with their recipient (``ON DELETE CASCADE``): when retention
  forgets a finished message, and when an operator deletes one.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import bindparam, delete, insert, select
from sqlalchemy.engine import Connection

from backupmx.queue.database import QueueDatabase
from backupmx.queue.models import delivery_attempts, recipients
from backupmx.queue.records import AttemptView, History, MessageView, RecipientView, Result
from backupmx.queue.state import VERDICT_EVENTS, State

# A constant, not a setting: ten attempts span the first day of the retry schedule
# (and, at `retry_max`, most of a day after it), which is what explains a deferral;
# the count of all attempts stays in `recipients.attempts`.
KEPT_ATTEMPTS = 10

_OUTCOMES = {event: verdict.value for verdict, event in VERDICT_EVENTS.items()}
_c = delivery_attempts.c
_INSERT = insert(delivery_attempts)
# A range of the primary key (recipient_id, number): cheap on both backends.
_TRIM = delete(delivery_attempts).where(
    _c.recipient_id == bindparam("recipient"), _c.number <= bindparam("dropped")
)


def write(conn: Connection, results: Sequence[Result], now: datetime) -> None:
    """Record one attempt per result (each with its claim's number, `claim_attempts`,
    set by the fence) and drop what falls out of each recipient's last `KEPT_ATTEMPTS`."""
    if not results:
        return
    conn.execute(
        _INSERT,
        [
            {
                "recipient_id": r.recipient_id,
                "number": r.claim_attempts,
                "at": now,
                "host": r.host,
                "outcome": _OUTCOMES[r.event],
                "reply": r.reply if r.reply is not None else r.error,
            }
            for r in results
        ],
    )
    trims = [
        {"recipient": r.recipient_id, "dropped": r.claim_attempts - KEPT_ATTEMPTS}
        for r in results
        if r.claim_attempts is not None and r.claim_attempts > KEPT_ATTEMPTS
    ]
    if trims:
        conn.execute(_TRIM, trims)


def not_kept(recipient: RecipientView, kept: Sequence[AttemptView]) -> int:
    """Attempts of this recipient that are no longer known: those before the first one
    kept; with none kept, every attempt made (the one under way, if `sending`, aside)."""
    if kept:
        return kept[0].number - 1
    return max(recipient.attempts - (recipient.state == State.SENDING), 0)


class Attempts(QueueDatabase):
    async def histories(self, message: MessageView) -> dict[int, History]:
        """Each recipient's kept attempts (by recipient id), oldest first."""
        query = (
            select(delivery_attempts)
            .join(recipients, recipients.c.id == _c.recipient_id)
            .where(recipients.c.message_id == message.id)
            .order_by(_c.recipient_id, _c.number)
        )
        kept: dict[int, list[AttemptView]] = {r.id: [] for r in message.recipients}
        async with self.engine.connect() as conn:
            for row in await conn.execute(query):
                kept[row.recipient_id].append(
                    AttemptView(row.number, row.at, row.host, row.outcome, row.reply)
                )
        return {r.id: History(kept[r.id], not_kept(r, kept[r.id])) for r in message.recipients}
