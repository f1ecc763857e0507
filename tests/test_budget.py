"""The memory budget that bounds each process's image work: what it lets through, in which order, and what
it gives back when a holder fails or gives up."""

from __future__ import annotations

import asyncio

import pytest

from gateway.budget import BudgetTimeout, MemoryBudget


async def test_holders_never_exceed_the_budget_and_are_served_in_arrival_order() -> None:
    budget = MemoryBudget(100)
    order: list[str] = []
    peak = 0

    async def work(name: str, nbytes: int) -> None:
        nonlocal peak
        async with budget.hold(nbytes):
            order.append(name)
            peak = max(peak, budget.used)
            await asyncio.sleep(0.01)

    # A large one behind small ones is not overtaken by the small ones that come after it.
    await asyncio.gather(work("a", 60), work("b", 30), work("large", 90), work("c", 10), work("d", 10))
    assert order == ["a", "b", "large", "c", "d"]
    assert peak <= 100 and budget.used == 0


async def test_one_larger_than_the_budget_runs_alone() -> None:
    budget = MemoryBudget(100)
    async with budget.hold(10):
        waiting = asyncio.create_task(asyncio.wait_for(budget.hold(500).__aenter__(), 0.05))
        with pytest.raises(asyncio.TimeoutError):
            await waiting  # the whole budget, once nothing else holds any
    async with budget.hold(500):
        assert budget.used == 100
    assert budget.used == 0


async def test_a_waiter_that_gives_up_frees_its_place() -> None:
    budget = MemoryBudget(100)
    async with budget.hold(80):
        with pytest.raises(BudgetTimeout):
            async with budget.hold(50, timeout=0.05):
                pass
        behind = asyncio.create_task(budget.hold(20).__aenter__())
        await asyncio.sleep(0)
        assert behind.done(), "the one behind the waiter that gave up fits, and is let in"
    assert budget.used == 20


async def test_a_holder_that_fails_gives_its_bytes_back() -> None:
    budget = MemoryBudget(100)
    with pytest.raises(RuntimeError):
        async with budget.hold(70):
            raise RuntimeError("a decoder failed")
    assert budget.used == 0
    task = asyncio.create_task(holding(budget, 70))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert budget.used == 0


async def holding(budget: MemoryBudget, nbytes: int) -> None:
    async with budget.hold(nbytes):
        await asyncio.sleep(10)
