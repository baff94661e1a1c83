"""Checks of the ``HeldLock`` contract that each built-in store's test file runs against its store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from convlock import InMemoryLockStore
from convlock.redis import RedisLockStore


async def check_granted_at_once(
    store: InMemoryLockStore | RedisLockStore, conversation_id: str, queued: Callable[[], Awaitable[None]]
) -> None:
    """``granted_at_once``: False before entering, True for a lock nobody held, False after queueing.

    ``queued()`` returns once the second hold waits behind the first.
    """
    first = store.lock(conversation_id)
    assert not first.granted_at_once, "not entered yet"
    async with first:
        assert first.granted_at_once
        second = store.lock(conversation_id)
        entered = asyncio.create_task(second.__aenter__())
        await queued()
        assert not entered.done()
    await asyncio.wait_for(entered, 5)
    try:
        assert not second.granted_at_once, "it queued behind the first"
    finally:
        await second.__aexit__(None, None, None)
