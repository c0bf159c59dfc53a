"""The deliveries' writer thread takes its turns in order, claims first (no database):
a claim asked while result batches wait runs before them, since connections wait for
claims and nothing waits for a result batch but its own messages' tasks."""

from __future__ import annotations

import asyncio
import threading

import pytest

from backupmx.queue.writer import Turns


async def test_claims_go_ahead_of_waiting_result_batches() -> None:
    turns = Turns()
    ran: list[str] = []
    busy = threading.Event()
    release = threading.Event()

    def hold() -> None:  # the thread is busy with a batch when the others are asked
        busy.set()
        release.wait(5)
        ran.append("busy")

    def work(name: str) -> str:
        ran.append(name)
        return name

    try:
        holding = asyncio.ensure_future(turns.run(hold, first=False))
        assert await asyncio.to_thread(busy.wait, 5)
        results = [asyncio.ensure_future(turns.run(lambda: work("results 1"), first=False))]
        results.append(asyncio.ensure_future(turns.run(lambda: work("results 2"), first=False)))
        await asyncio.sleep(0)  # both results batches are waiting before the claim asks
        claim = asyncio.ensure_future(turns.run(lambda: work("claim"), first=True))
        await asyncio.sleep(0)
        release.set()
        assert await claim == "claim"
        await asyncio.gather(holding, *results)
        assert ran == ["busy", "claim", "results 1", "results 2"]
    finally:
        release.set()
        turns.stop()


async def test_an_error_reaches_the_one_who_asked() -> None:
    turns = Turns()

    def fail() -> None:
        raise ValueError("database is locked")

    try:
        with pytest.raises(ValueError, match="database is locked"):
            await turns.run(fail, first=True)
        assert await turns.run(lambda: 42, first=False) == 42  # the thread lives on
    finally:
        turns.stop()
