"""The queue's footprint (`backupmx.queue.space`) on an SQLite queue in a temporary
directory: the database's files as they are on disk, and the free space beside them.

No server and no intake process: the store is opened and migrated, never started.
PostgreSQL's size, against a real server, is in tests/integration/test_store.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backupmx.queue import space
from backupmx.queue.database import upgrade
from backupmx.queue.space import Footprint, sqlite_footprint
from backupmx.queue.store import Store


async def test_sqlite_footprint_is_the_file_and_its_wal_as_found_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    store = Store.open(f"sqlite:///{path}")
    try:
        await upgrade(store.engine)
        footprint = await store.footprint()
        wal = tmp_path / "queue.db-wal"  # kept while the store's connections are open
        assert wal.stat().st_size > 0
        assert footprint.database_bytes == path.stat().st_size + wal.stat().st_size
        disk = os.statvfs(tmp_path)
        assert footprint.free_bytes is not None
        assert 0 < footprint.free_bytes <= disk.f_blocks * disk.f_frsize
    finally:
        await store.close()


def test_free_space_is_what_an_unprivileged_user_may_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """f_bavail (root's reserve left out, backupmx is not root) in f_frsize units."""
    path = tmp_path / "queue.db"
    path.write_bytes(b"x" * 5000)
    # bsize, frsize, blocks, bfree, bavail, files, ffree, favail, flag, namemax
    disk = os.statvfs_result((4096, 1024, 10_000, 3_000, 2_000, 0, 0, 0, 0, 255))
    monkeypatch.setattr(space.os, "statvfs", lambda _: disk)
    assert sqlite_footprint(str(path)) == Footprint(5000, 2_000 * 1024)


def test_a_missing_wal_counts_as_nothing_and_a_missing_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    path.write_bytes(b"x" * 5000)
    assert sqlite_footprint(str(path)).database_bytes == 5000
    (tmp_path / "queue.db-wal").write_bytes(b"w" * 700)
    assert sqlite_footprint(str(path)).database_bytes == 5700
    with pytest.raises(FileNotFoundError):
        sqlite_footprint(str(tmp_path / "moved-away.db"))
