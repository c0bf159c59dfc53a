"""The queue database's footprint: how much disk it takes, and how much is left beside it.

`footprint` reads two figures for ``status`` and the metrics:

* the database's size in bytes — SQLite: the main file and its ``-wal`` file as
  they are on disk (what the queue costs the filesystem, checkpoints and
  incremental vacuum included); PostgreSQL: ``pg_database_size`` of the current
  database;
* the bytes free to an unprivileged process on the filesystem that holds the
  SQLite file (``statvfs``: ``f_bavail × f_frsize``, without the blocks reserved
  for root, which ``backupmx`` is not).  For PostgreSQL it is None: that disk is
  the database server's, watched where the server runs.

Promises: cheap enough for every scrape — SQLite costs two ``stat`` calls and one
``statvfs``, in a worker thread so that a hung filesystem holds up only the caller
(whose timeout then answers); PostgreSQL one catalogue function, which sums the
sizes of the database's files without reading a table.  Nothing here scans rows
or changes the queue.  A file that is gone or a database that does not answer
raises to the caller, as every read of the store does; a missing ``-wal`` file
counts as 0 bytes (SQLite removes it when the last connection closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import make_url

from backupmx.queue.database import QueueDatabase


@dataclass(frozen=True)
class Footprint:
    database_bytes: int  # the database's files on disk (SQLite) or pg_database_size
    free_bytes: int | None  # free to us beside the SQLite file; None: not ours to see


class Space(QueueDatabase):
    async def footprint(self) -> Footprint:
        """The database's size and the free space of its filesystem (see the module docstring)."""
        if self.dialect == "sqlite":
            path = make_url(self.url).database or ""
            return await asyncio.to_thread(sqlite_footprint, path)
        async with self.engine.connect() as conn:
            size = await conn.scalar(text("SELECT pg_database_size(current_database())"))
        return Footprint(int(size or 0), None)


def sqlite_footprint(path: str) -> Footprint:
    """The main file plus its WAL, and the free bytes of the filesystem holding them."""
    size = os.stat(path).st_size
    with contextlib.suppress(FileNotFoundError):
        size += os.stat(f"{path}-wal").st_size
    disk = os.statvfs(path)
    return Footprint(size, disk.f_bavail * disk.f_frsize)
