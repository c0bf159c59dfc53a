"""alembic environment: migrations run on the connection backupmx hands over.

`backupmx db upgrade` (and `serve` at start-up) call `backupmx.queue.database.upgrade`,
which puts an open connection in ``config.attributes["connection"]``.
"""

from alembic import context

from backupmx.queue.models import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=True,
    transaction_per_migration=True,
)
with context.begin_transaction():
    context.run_migrations()
