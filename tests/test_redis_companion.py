"""Companion scripts on RedisLockStore: work that rides on the lock's own draw and release."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from convlock import LockStoreUnavailable
from convlock.redis import RedisLockStore, scripts
from convlock.redis.companion import Companion
from redis_procs import RedisProcess

# The companion counts grants at once in its own key and, at release, appends
# ARGV[4] to a list, both in the conversation's slot.
COUNTING = Companion(
    issue=scripts.issue_script(
        "test_count_in",
        "local function companion_in(t) return redis.call('INCR', KEYS[2]) end",
    ),
    release=scripts.release_script(
        "test_count_out",
        "local function companion_out() return redis.call('RPUSH', KEYS[3], ARGV[4]) end",
    ),
    keys=("cmp:{c}:grants", "cmp:{c}:log"),
)

FAILING = Companion(
    issue=COUNTING.issue,
    release=scripts.release_script(
        "test_fail_out", "local function companion_out() error('the companion fails before the release') end"
    ),
    keys=COUNTING.keys,
)


@pytest.fixture
async def store(redis_server: RedisProcess) -> AsyncIterator[RedisLockStore]:
    lock_store = RedisLockStore(redis_server.url(), key_prefix="cmp", lifetime=5, socket_timeout=2)
    yield lock_store
    await lock_store.aclose()
    redis_server.command("DEL", *COUNTING.keys)


async def test_a_companion_rides_on_the_draw_and_the_release(store: RedisLockStore, redis_server: RedisProcess) -> None:
    first = store.lock("c", companion=COUNTING)
    async with first:
        assert first.companion_reply == 1  # granted at once: its first step ran
        second = store.lock("c", companion=COUNTING)
        entered = asyncio.create_task(second.__aenter__())
        await asyncio.sleep(0.05)
        assert not entered.done()
        assert await first.release_with(["first"]) == 1  # the companion's reply; the lock handed on
        await asyncio.wait_for(entered, 2)
    assert second.companion_reply is None  # it waited: the companion's first step did not run for it
    assert second.ticket > first.ticket
    assert await second.release_with(["second"]) == 2
    await second.__aexit__(None, None, None)  # releases nothing more
    assert redis_server.command("GET", "cmp:{c}:grants") == "1"
    assert redis_server.command("LRANGE", "cmp:{c}:log", 0, -1) == ["first", "second"]
    assert await store.inspect("c") is None
    with pytest.raises(RuntimeError):
        await second.release_with(["again"])


async def test_a_release_script_that_fails_still_releases_the_lock(store: RedisLockStore) -> None:
    held = store.lock("c", companion=FAILING)
    async with held:
        with pytest.raises(LockStoreUnavailable, match="the companion fails"):
            await held.release_with(["x"])
    # Plain RELEASE ran in the background: the next lock is granted at once, not after the 5 s lease.
    async with asyncio.timeout(2):
        async with store.lock("c") as after:
            assert after.ticket > held.ticket
    assert store.statistics()["release_failures"] == 1
