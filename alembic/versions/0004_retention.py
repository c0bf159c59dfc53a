"""Retention: finished messages, and due mail found per domain.

* ``messages.finished_at``: when the last recipient became final.  Messages
  already finished are marked so now (their last recipient's update time).
* ``bodies``: the bodies of pending messages move to a table of their own (those
  of finished messages are dropped), so that a body takes its pages with it.
* ``messages.delay_warned``: every pending recipient has had its delay warning.
* ``ix_messages_pending`` and ``ix_messages_unwarned`` (pending, or not yet
  warned, messages by age; partial) for the sweeps, and ``ix_messages_finished``
  for the retention sweep.
* ``ix_recipients_due`` becomes (state, domain, next_attempt_at), which also
  serves what ``ix_recipients_domain`` did; every domain with pending mail gets
  its ``domains`` row (the delivery loop walks domains, not recipients).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from backupmx.queue.models import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

PENDING = "('queued', 'sending', 'held')"


def upgrade() -> None:
    # Plain ALTER TABLE ADD COLUMN, not a batch: on SQLite a batch may rebuild the
    # table, and dropping the old ``messages`` would cascade to every recipient.
    op.add_column("messages", sa.Column("finished_at", UTCDateTime))
    op.add_column(
        "messages",
        sa.Column("delay_warned", sa.Boolean, nullable=False, server_default=sa.text("false")),
    )
    op.execute(
        "UPDATE messages SET finished_at = COALESCE("
        " (SELECT MAX(updated_at) FROM recipients WHERE message_id = messages.id),"
        " received_at)"
        " WHERE NOT EXISTS (SELECT 1 FROM recipients"
        f"  WHERE message_id = messages.id AND state IN {PENDING})"
    )
    op.create_table(
        "bodies",
        sa.Column(
            "message_id",
            sa.String(32),
            sa.ForeignKey("messages.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )
    op.execute(
        "INSERT INTO bodies (message_id, body)"
        " SELECT id, body FROM messages WHERE finished_at IS NULL"
    )
    # ALTER TABLE … DROP COLUMN (SQLite 3.35 and later) rewrites the rows in place; a
    # batch would rebuild the table, and dropping the old one would cascade to every
    # recipient.
    op.drop_column("messages", "body")
    # The conditions as SQLAlchemy writes them in queries (SQLite matches a partial
    # index only to a query term written the same way: "= 0", not "= false").
    finished_at, warned = sa.column("finished_at"), sa.column("delay_warned")
    partial = {
        "ix_messages_pending": ("received_at", finished_at.is_(None)),
        "ix_messages_unwarned": ("received_at", finished_at.is_(None) & (warned == sa.false())),
        "ix_messages_finished": ("finished_at", finished_at.is_not(None)),
    }
    for name, (column, condition) in partial.items():
        op.create_index(
            name, "messages", [column], sqlite_where=condition, postgresql_where=condition
        )
    op.execute(
        "UPDATE messages SET delay_warned = true WHERE finished_at IS NULL AND NOT EXISTS"
        " (SELECT 1 FROM recipients WHERE message_id = messages.id"
        "  AND state IN ('queued', 'held') AND delay_warned = false)"
        " AND EXISTS (SELECT 1 FROM recipients WHERE message_id = messages.id"
        "  AND delay_warned = true)"
    )
    op.drop_index("ix_recipients_due", "recipients")
    op.drop_index("ix_recipients_domain", "recipients")
    op.create_index("ix_recipients_due", "recipients", ["state", "domain", "next_attempt_at"])
    op.execute(
        sa.text(
            "INSERT INTO domains (name, state, since, updated_at)"
            " SELECT DISTINCT domain, 'unknown', :now, :now FROM recipients"
            f" WHERE state IN {PENDING} AND domain NOT IN (SELECT name FROM domains)"
        ).bindparams(sa.bindparam("now", datetime.now(UTC), type_=UTCDateTime()))
    )


def downgrade() -> None:
    op.drop_index("ix_recipients_due", "recipients")
    op.create_index("ix_recipients_due", "recipients", ["state", "next_attempt_at"])
    op.create_index("ix_recipients_domain", "recipients", ["domain", "state"])
    op.drop_index("ix_messages_finished", "messages")
    op.drop_index("ix_messages_unwarned", "messages")
    op.drop_index("ix_messages_pending", "messages")
    # The new columns stay (removing them on SQLite would rebuild ``messages``, whose
    # drop cascades to the recipients; the code of 0003 ignores them), and the bodies
    # of finished messages are gone for good.
    op.add_column("messages", sa.Column("body", sa.LargeBinary, nullable=False, server_default=""))
    op.execute(
        "UPDATE messages SET body = (SELECT body FROM bodies WHERE message_id = messages.id)"
        " WHERE id IN (SELECT message_id FROM bodies)"
    )
    op.drop_table("bodies")
