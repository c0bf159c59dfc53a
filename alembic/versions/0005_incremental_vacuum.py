"""SQLite gives freed pages back to the filesystem: ``auto_vacuum = INCREMENTAL``.

A new SQLite queue gets the mode when its first table is created (the engine sets
the pragma on every connection, `backupmx.queue.database`).  An existing file
keeps the mode it was created with until it is rebuilt, so this migration
rebuilds it once with ``VACUUM``, outside any transaction (VACUUM cannot run in
one), which also gives back at once the space of the bodies that migration 0004
emptied.  It needs free disk space about the size of the file while it runs.
From then on the retention sweep returns free pages a bounded batch at a time
(``PRAGMA incremental_vacuum``).  PostgreSQL needs nothing here (autovacuum).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

INCREMENTAL = 2  # PRAGMA auto_vacuum: 0 none, 1 full, 2 incremental


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    if bind.exec_driver_sql("PRAGMA auto_vacuum").scalar() == INCREMENTAL:
        return
    with op.get_context().autocommit_block():
        bind.exec_driver_sql("PRAGMA auto_vacuum = INCREMENTAL")
        bind.exec_driver_sql("VACUUM")


def downgrade() -> None:
    pass
