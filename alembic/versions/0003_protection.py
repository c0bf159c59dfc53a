"""Protection: the recipient-verification cache, greylisting triplets, spam verdicts.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

from backupmx.queue.models import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("spam_verdict", sa.String(16)))
        batch.add_column(sa.Column("spam_score", sa.Float))
        batch.add_column(sa.Column("spam_detail", sa.Text))
    op.create_table(
        "recipient_verdicts",
        sa.Column("address", sa.String(320), primary_key=True),
        sa.Column("valid", sa.Boolean, nullable=False),
        sa.Column("reply", sa.Text),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("checked_at", UTCDateTime, nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_recipient_verdicts_expires", "recipient_verdicts", ["expires_at"])
    op.create_table(
        "greylist",
        sa.Column("client_net", sa.String(64), primary_key=True),
        sa.Column("sender", sa.String(320), primary_key=True),
        sa.Column("recipient", sa.String(320), primary_key=True),
        sa.Column("first_seen", UTCDateTime, nullable=False),
        sa.Column("last_seen", UTCDateTime, nullable=False),
        sa.Column("passed_at", UTCDateTime),
    )
    op.create_index("ix_greylist_last_seen", "greylist", ["last_seen"])
    op.create_index("ix_recipients_finished", "recipients", ["state", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_recipients_finished", "recipients")
    op.drop_table("greylist")
    op.drop_table("recipient_verdicts")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("spam_detail")
        batch.drop_column("spam_score")
        batch.drop_column("spam_verdict")
