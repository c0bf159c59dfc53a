"""The queue: messages (body included) and recipients.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

from backupmx.queue.models import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("sender", sa.Text, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("received_at", UTCDateTime, nullable=False),
        sa.Column("client_ip", sa.String(64), nullable=False),
        sa.Column("client_helo", sa.Text, nullable=False),
        sa.Column("protocol", sa.String(16), nullable=False),
        sa.Column("tls", sa.Text),
        sa.Column("body_type", sa.String(16), nullable=False),
        sa.Column("smtputf8", sa.Boolean, nullable=False),
        sa.Column("dsn_ret", sa.String(8)),
        sa.Column("dsn_envid", sa.Text),
        sa.Column("session_id", sa.String(32), nullable=False),
    )
    op.create_table(
        "recipients",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column(
            "message_id",
            sa.String(32),
            sa.ForeignKey("messages.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("domain", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", UTCDateTime, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("lease_owner", sa.String(64)),
        sa.Column("lease_until", UTCDateTime),
        sa.Column("dsn_notify", sa.String(32)),
        sa.Column("dsn_orcpt", sa.Text),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_recipients_due", "recipients", ["state", "next_attempt_at"])
    op.create_index("ix_recipients_lease", "recipients", ["state", "lease_until"])
    op.create_index("ix_recipients_domain", "recipients", ["domain", "state"])
    op.create_index("ix_recipients_message", "recipients", ["message_id"])


def downgrade() -> None:
    op.drop_table("recipients")
    op.drop_table("messages")
