"""Each recipient's last delivery attempts, for `queue show`.

* ``delivery_attempts``: one row per delivery attempt whose result was recorded
  (when, the host that answered, the outcome, the reply), at most
  ``KEPT_ATTEMPTS`` per recipient (`backupmx.queue.attempts`), deleted with the
  recipient.  Recipients tried before this schema have no rows: `queue show`
  counts their attempts as not kept.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

from backupmx.queue.models import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "delivery_attempts",
        sa.Column(
            "recipient_id",
            sa.BigInteger,
            sa.ForeignKey("recipients.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("number", sa.Integer, primary_key=True),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("host", sa.Text),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reply", sa.Text),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("delivery_attempts")
