"""The budget of large bodies in serve's memory: a body waits until it fits, and one
alone always gets in, whatever its size."""

from __future__ import annotations

import asyncio

from backupmx.deliver.bodies import BodyBudget

MiB = 1024 * 1024


async def test_a_body_waits_until_the_others_make_room() -> None:
    budget = BodyBudget(16 * MiB)
    order: list[str] = []
    release = asyncio.Event()

    async def send(name: str, size: int) -> None:
        async with budget.room(size):
            order.append(f"{name} in")
            await release.wait()
        order.append(f"{name} out")

    first = asyncio.create_task(send("a", 10 * MiB))
    second = asyncio.create_task(send("b", 10 * MiB))
    await asyncio.sleep(0.01)
    assert order == ["a in"] and budget.held == 10 * MiB  # b does not fit beside a
    release.set()
    await asyncio.gather(first, second)
    assert order == ["a in", "a out", "b in", "b out"]
    assert budget.held == 0


async def test_one_body_alone_gets_in_whatever_its_size() -> None:
    budget = BodyBudget(16 * MiB)
    async with budget.room(50 * MiB):
        assert budget.held == 50 * MiB
    assert budget.held == 0


async def test_bodies_that_fit_together_are_in_memory_together() -> None:
    budget = BodyBudget(16 * MiB)
    async with budget.room(4 * MiB), budget.room(4 * MiB), budget.room(8 * MiB):
        assert budget.held == 16 * MiB
