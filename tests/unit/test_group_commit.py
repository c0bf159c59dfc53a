"""The group-commit writer, pure: concurrent submissions share batches, and a failed
batch reaches every session waiting on it (a fake write function, no database).

The queue store it feeds, on SQLite and PostgreSQL, is tested in
tests/integration/test_store.py.
"""

from __future__ import annotations

import asyncio

from backupmx.queue.writer import GroupCommitWriter


async def test_group_commit_batches_concurrent_sessions() -> None:
    batches: list[int] = []

    async def write(batch: object) -> None:
        batches.append(len(batch))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)

    class Item:
        size = 10

    writer: GroupCommitWriter[Item] = GroupCommitWriter(write)
    writer.start()
    await asyncio.gather(*(writer.submit(Item()) for _ in range(100)))
    await writer.stop()
    assert sum(batches) == 100
    assert len(batches) < 10


async def test_group_commit_failure_reaches_every_waiting_session() -> None:
    async def write(batch: object) -> None:
        raise OSError(28, "No space left on device")

    class Item:
        size = 10

    writer: GroupCommitWriter[Item] = GroupCommitWriter(write)
    writer.start()
    results = await asyncio.gather(
        *(writer.submit(Item()) for _ in range(5)), return_exceptions=True
    )
    await writer.stop()
    assert all(isinstance(r, OSError) for r in results)
