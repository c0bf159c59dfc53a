"""Several nodes on one queue: a node registry, each node's view of the primaries,
and leases that follow their node's heartbeat.

* ``nodes``: one row per ``serve`` process sharing the queue, written every
  heartbeat (`backupmx.queue.nodes`).
* ``primary_views``: what each node last saw of each domain's primary.
* ``ix_recipients_owner`` (state, lease_owner) replaces ``ix_recipients_lease``
  (state, lease_until): a dead node's ``sending`` rows are found by owner, and
  ``lease_until`` is no longer written (a lease lasts while its node's heartbeat
  does).  The column stays: dropping it would rebuild the recipients table on
  SQLite.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

from backupmx.queue.models import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("hostname", sa.Text, nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("listen", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("last_seen", UTCDateTime, nullable=False),
        sa.Column("in_flight", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("delivered", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("delivery_rate", sa.Float, nullable=False, server_default=sa.text("0")),
        sa.Column("stopped_at", UTCDateTime),
    )
    op.create_table(
        "primary_views",
        sa.Column("domain", sa.String(255), primary_key=True),
        sa.Column("node", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("since", UTCDateTime, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.drop_index("ix_recipients_lease", table_name="recipients")
    op.create_index("ix_recipients_owner", "recipients", ["state", "lease_owner"])
    # Leases taken before this schema end with it: their owners wrote no heartbeat.
    op.execute(
        "UPDATE recipients SET state = 'queued', lease_owner = NULL, lease_until = NULL"
        " WHERE state = 'sending'"
    )


def downgrade() -> None:
    op.drop_index("ix_recipients_owner", table_name="recipients")
    op.create_index("ix_recipients_lease", "recipients", ["state", "lease_until"])
    op.drop_table("primary_views")
    op.drop_table("nodes")
