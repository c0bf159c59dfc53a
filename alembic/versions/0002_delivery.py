"""Delivery: per-domain primary state, and the delay-warning mark on recipients.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

from backupmx.queue.models import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("recipients") as batch:
        batch.add_column(
            sa.Column("delay_warned", sa.Boolean, nullable=False, server_default=sa.false())
        )
    op.create_table(
        "domains",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("since", UTCDateTime, nullable=False),
        sa.Column("route", sa.Text),
        sa.Column("reason", sa.Text),
        sa.Column("last_probe_at", UTCDateTime),
        sa.Column("last_probe_result", sa.Text),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("domains")
    with op.batch_alter_table("recipients") as batch:
        batch.drop_column("delay_warned")
