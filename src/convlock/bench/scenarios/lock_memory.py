"""Scenarios 1 and 2: ``InMemoryLockStore`` against ``asyncio.Lock``, in interleaved blocks.

A fresh ``asyncio.Lock`` per block: once contended, an ``asyncio.Lock``
keeps an empty deque and its uncontended path slows down, which would
flatter convlock. Target for both ratios (convlock time ÷ asyncio.Lock
time): at most 2.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from ...memory import InMemoryLockStore
from ..measure import median
from ..report import Figure, Target
from . import Context

__all__ = ["contended", "uncontended"]

CYCLES_PER_BLOCK = 2000
TASKS = 20
CYCLES_PER_TASK = 50

Make = Callable[[], AbstractAsyncContextManager[Any]]


async def _uncontended_block(make: Make) -> float:
    start = time.perf_counter()
    for _ in range(CYCLES_PER_BLOCK):
        async with make():
            pass
    return (time.perf_counter() - start) / CYCLES_PER_BLOCK


async def _contended_block(make: Make) -> float:
    async def worker() -> None:
        for _ in range(CYCLES_PER_TASK):
            async with make():
                await asyncio.sleep(0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(TASKS)))
    return time.perf_counter() - start


async def _compare(block: Callable[[Make], Awaitable[float]], blocks: int) -> tuple[float, float]:
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(blocks):
        lock = asyncio.Lock()
        theirs.append(await block(lambda lock=lock: lock))  # type: ignore[misc]
        store = InMemoryLockStore()
        ours.append(await block(lambda store=store: store.lock("conversation")))  # type: ignore[misc]
    return median(ours), median(theirs)


def uncontended(ctx: Context) -> None:
    """Scenario 1: one acquire+release of an idle conversation."""
    blocks = 6 if ctx.quick else 60
    asyncio.run(_compare(_uncontended_block, 3))  # warm-up: neither pays first-call costs
    ours, theirs = asyncio.run(_compare(_uncontended_block, blocks))
    ctx.results.add(
        Figure("memory-uncontended", "acquire+release", ours * 1e6, "µs", theirs * 1e6, "asyncio.Lock",
               target=Target("<=", 2))
    )


def contended(ctx: Context) -> None:
    """Scenario 2: 20 tasks x 50 cycles on one conversation, each yielding inside the lock."""
    blocks = 6 if ctx.quick else 60
    ours, theirs = asyncio.run(_compare(_contended_block, blocks))
    ctx.results.add(
        Figure("memory-contended", f"{TASKS} tasks x {CYCLES_PER_TASK} cycles", ours * 1e3, "ms",
               theirs * 1e3, "asyncio.Lock", target=Target("<=", 2))
    )
