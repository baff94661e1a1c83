"""InMemoryLockStore against asyncio.Lock, measured side by side in one run.

Prints two ratios (convlock time / asyncio.Lock time; lower is better, the
target is at most 2):

* uncontended: one ``async with`` acquire plus release on an idle conversation;
* contended: 20 tasks x 50 cycles on one conversation, every cycle yielding
  once inside the lock so that each release really hands off to a waiter.

The machines this runs on are noisy, so the two contenders alternate in
short blocks and the medians of the blocks are compared (see
shared/notes/measuring.md). A fresh asyncio.Lock is used per block: once
contended, an asyncio.Lock keeps an empty deque and its uncontended path
slows down, which would flatter convlock.

Run: .venv/bin/python bench/memory_lock.py [--blocks N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from convlock import InMemoryLockStore

CYCLES_PER_BLOCK = 2000
TASKS = 20
CYCLES_PER_TASK = 50


async def uncontended(make: Callable[[], AbstractAsyncContextManager[Any]]) -> float:
    """Seconds per acquire+release of an idle lock, over one block."""
    start = time.perf_counter()
    for _ in range(CYCLES_PER_BLOCK):
        async with make():
            pass
    return (time.perf_counter() - start) / CYCLES_PER_BLOCK


async def contended(make: Callable[[], AbstractAsyncContextManager[Any]]) -> float:
    """Seconds for TASKS tasks doing CYCLES_PER_TASK cycles each on one lock."""

    async def worker() -> None:
        for _ in range(CYCLES_PER_TASK):
            async with make():
                await asyncio.sleep(0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(TASKS)))
    return time.perf_counter() - start


async def compare(
    name: str,
    run: Callable[[Callable[[], AbstractAsyncContextManager[Any]]], Awaitable[float]],
    blocks: int,
) -> float:
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(blocks):
        lock = asyncio.Lock()
        theirs.append(await run(lambda lock=lock: lock))  # type: ignore[misc]
        store = InMemoryLockStore()
        ours.append(await run(lambda store=store: store.lock("conversation")))  # type: ignore[misc]
    a, b = statistics.median(theirs), statistics.median(ours)
    ratio = b / a
    unit = "us/cycle" if run is uncontended else "ms/run"
    scale = 1e6 if run is uncontended else 1e3
    print(
        f"{name:<12} asyncio.Lock {a * scale:8.3f} {unit}   convlock {b * scale:8.3f} {unit}   "
        f"ratio {ratio:.2f} (target <= 2)"
    )
    return ratio


async def main(blocks: int) -> int:
    # Warm up both paths so that neither pays for first-call costs.
    await compare("warm-up", uncontended, 3)
    print("-" * 96)
    ratios = [
        await compare("uncontended", uncontended, blocks),
        await compare("contended", contended, blocks),
    ]
    return 0 if all(r <= 2 for r in ratios) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, default=60, help="alternating blocks per contender")
    raise SystemExit(asyncio.run(main(parser.parse_args().blocks)))
