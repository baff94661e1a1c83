"""Edges an adversarial review of RedisLockStore reproduced, each against a real redis-server.

Each test here failed before the fix it names: clients passed in that re-send
or never time out, timers planned from a holder that is gone, dead waiters
given fresh leases, absurd lifetimes, waits that hung on Redis's 100 ms tick,
and a forced release that a non-renewing hold never heard of.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time

import pytest
import redis
import redis.asyncio as aioredis

from convlock import LockStoreUnavailable, LockTimeoutError
from convlock.redis import RedisLockStore, scripts
from convlock.redis.keys import KeySpace
from redis_procs import RedisProcess

PREFIX = "h"


def _keys(proc: RedisProcess) -> list[str]:
    with proc.client() as client:
        return sorted(str(key) for key in client.scan_iter(count=1000))


async def _until_no_keys(proc: RedisProcess, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while _keys(proc):
        assert time.monotonic() < deadline, f"keys left: {_keys(proc)[:5]}"
        await asyncio.sleep(0.02)


@pytest.fixture
def slow_tick(fresh_redis: RedisProcess) -> RedisProcess:
    """A server whose timer ticks once a second (``hz 1``): blocking reads time out late."""
    fresh_redis.command("CONFIG", "SET", "hz", "1")
    return fresh_redis


def _dead_ticket(proc: RedisProcess, conversation_id: str, lease: float) -> tuple[int, float, float]:
    """Draw a ticket as a process that then dies would: nobody renews it or reads its wake-ups.

    Returns the ticket and the local times just before and after the draw.
    """
    state = KeySpace(PREFIX).keys(conversation_id).state
    with proc.client() as client:
        sent = time.monotonic()
        reply = client.eval(scripts.ISSUE.source, 1, state, round(lease * 1_000_000), "deadbeef0000:1")
        received = time.monotonic()
    ticket = reply if isinstance(reply, int) else int(reply[0])
    return ticket, sent, received


# -- 1. a client passed in gets the store's discipline


async def test_a_client_passed_in_never_resends_a_draw_that_timed_out(fresh_redis: RedisProcess) -> None:
    # redis-py's default policy re-sends a command after a timeout.
    client = aioredis.Redis(**fresh_redis.client_kwargs(), socket_timeout=0.5)
    assert client.get_retry() is not None
    store = RedisLockStore(client, key_prefix=PREFIX, lifetime=5, socket_timeout=0.5)
    try:
        async with store.lock("warm"):
            pass
        fresh_redis.command("CLIENT", "PAUSE", 1200)
        started = time.monotonic()
        with pytest.raises(LockStoreUnavailable, match=r"socket_timeout=0\.5"):
            async with store.lock("resend"):
                pytest.fail("granted while Redis was paused")
        assert time.monotonic() - started < 1.0
        await asyncio.sleep(1.0)  # the pause ends; the draw runs once, and is withdrawn by its ID
        # Not queued behind a ghost ticket for the 5 s lease: granted at once.
        async with store.lock("resend", wait_timeout=1.0) as held:
            assert held.ticket > 0
        with fresh_redis.client() as sync:
            calls = sync.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        # warm (2) + the paused draw (1) + its withdrawal (1) + the last cycle (2):
        # a re-sent draw would add one more.
        assert calls <= 6
    finally:
        await store.aclose()
        await client.aclose()
    await _until_no_keys(fresh_redis)


async def test_every_call_on_a_client_passed_in_is_bounded_by_socket_timeout(
    fresh_redis: RedisProcess,
) -> None:
    client = aioredis.Redis(**fresh_redis.client_kwargs())  # no socket timeout at all
    store = RedisLockStore(client, key_prefix=PREFIX, lifetime=5, socket_timeout=1)
    async with store.lock("warm"):
        pass
    os.kill(fresh_redis.pid, signal.SIGSTOP)
    try:
        for call in (store.lock("stopped").__aenter__(), store.inspect("stopped"), store.ping()):
            started = time.monotonic()
            with pytest.raises(LockStoreUnavailable):
                await asyncio.wait_for(call, 5)
            assert time.monotonic() - started < 1.8
    finally:
        os.kill(fresh_redis.pid, signal.SIGCONT)
        await store.aclose()
        await client.aclose()


def test_a_cluster_client_that_resends_is_refused() -> None:
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", 1)])  # never connected
    with pytest.raises(ValueError, match=r"retry=Retry\(NoBackoff\(\), 0\)"):
        RedisLockStore(client)


# -- 2 and 3. timers follow the queue as it is now; dead waiters get no fresh lease


async def test_a_waiter_behind_a_dead_ticket_is_served_when_that_ticket_lapses(
    fresh_redis: RedisProcess,
) -> None:
    holders = RedisLockStore(fresh_redis.url(), key_prefix=PREFIX, lifetime=5)
    waiters = RedisLockStore(fresh_redis.url(), key_prefix=PREFIX, lifetime=5)
    try:
        holder = holders.lock("dead")
        await holder.__aenter__()
        _, sent, received = _dead_ticket(fresh_redis, "dead", lease=1.5)
        granted_at: list[float] = []

        async def wait() -> None:
            async with waiters.lock("dead"):
                granted_at.append(time.monotonic())

        task = asyncio.create_task(wait())
        await asyncio.sleep(0.3)
        # The lock passes to the dead ticket, with 1.2 s left on its waiting
        # lease. It must not get a fresh 5 s lease, and the live waiter must
        # look again when that waiting lease ends, not when the old holder's
        # (4.7 s away) or its own keep-alive would have.
        await holder.__aexit__(None, None, None)
        await asyncio.wait_for(task, 5)
        lapse = (sent + 1.5, received + 1.5)  # the dead ticket's lease ended in this window
        assert granted_at[0] >= lapse[0] - 0.01, "granted while the dead ticket's lease ran"
        assert granted_at[0] - lapse[1] < 0.1, f"served {granted_at[0] - lapse[1]:.3f}s after the lapse"
    finally:
        await holders.aclose()
        await waiters.aclose()
    await _until_no_keys(fresh_redis)


async def test_a_waiter_whose_waiting_lease_lapsed_is_skipped(fresh_redis: RedisProcess) -> None:
    store = RedisLockStore(fresh_redis.url(), key_prefix=PREFIX, lifetime=5)
    try:
        async with store.lock("skip") as held:
            dead, _, _ = _dead_ticket(fresh_redis, "skip", lease=0.2)
            waiter = asyncio.create_task(_hold(store, "skip"))
            await asyncio.sleep(0.4)  # the dead waiter's lease lapses while it waits
            assert not waiter.done()
        ticket = await asyncio.wait_for(waiter, 1)
        assert ticket > dead > held.ticket
    finally:
        await store.aclose()
    await _until_no_keys(fresh_redis)


async def _hold(store: RedisLockStore, conversation_id: str) -> int:
    async with store.lock(conversation_id) as held:
        return held.ticket


# -- 4. lifetimes within sane bounds; no key without a TTL


@pytest.mark.parametrize("lifetime", [1e-9, 0.001, 31 * 24 * 3600.0, 1e13, 1e14])
async def test_lifetimes_outside_the_bounds_are_refused(fresh_redis: RedisProcess, lifetime: float) -> None:
    store = RedisLockStore(fresh_redis.url(), key_prefix=PREFIX)
    try:
        with pytest.raises(ValueError, match=r"from 0.01 s \(10 ms\) to 2.592e\+06 s \(30 days\)"):
            store.lock("bounds", lifetime=lifetime)
        with pytest.raises(ValueError, match="30 days"):
            RedisLockStore(fresh_redis.url(), lifetime=lifetime)
    finally:
        await store.aclose()
    assert _keys(fresh_redis) == []


@pytest.mark.parametrize("length", ["1e+20", "100000000000000000000", "-5", "0", "12.5", "abc"])
def test_the_draw_script_refuses_a_bad_lease_before_writing(fresh_redis: RedisProcess, length: str) -> None:
    state = KeySpace(PREFIX).keys("raw").state
    with fresh_redis.client() as client:
        with pytest.raises(redis.ResponseError, match="lease length"):
            client.eval(scripts.ISSUE.source, 1, state, length, "x:1")
        assert _keys(fresh_redis) == []


async def test_every_key_has_a_ttl_and_numbers_are_integer_strings(fresh_redis: RedisProcess) -> None:
    store = RedisLockStore(fresh_redis.url(), key_prefix=PREFIX)
    other = RedisLockStore(fresh_redis.url(), key_prefix=PREFIX)
    longest = 30 * 24 * 3600.0  # the upper bound: its TTL must still be an integer
    try:
        async with store.lock("ttl", lifetime=longest):
            waiter = asyncio.create_task(_hold(other, "ttl"))
            await asyncio.sleep(0.2)
            with fresh_redis.client() as client:
                keys = _keys(fresh_redis)
                assert len(keys) >= 2
                for key in keys:
                    assert client.pttl(key) > 0, f"{key} has no TTL"
                state = client.hgetall(KeySpace(PREFIX).keys("ttl").state)
            numbers = {field: value for field, value in state.items() if not field.startswith("o")}
            assert all(value.isdigit() for value in numbers.values()), numbers
            snapshot = await store.inspect("ttl")
            assert snapshot is not None
            assert snapshot.serving is not None
            assert snapshot.serving.expires_in > longest - 60
        await asyncio.wait_for(waiter, 5)
    finally:
        await store.aclose()
        await other.aclose()
    await _until_no_keys(fresh_redis)


def test_tickets_up_to_2_53_are_written_exactly(fresh_redis: RedisProcess) -> None:
    # The scripts print numbers with '%d' where Lua's long has 64 bits: a
    # counter just below 2^53 (the last integer a double holds exactly)
    # must come back digit for digit, not rounded or in exponent form.
    state = KeySpace(PREFIX).keys("big").state
    last = 2**53 - 2
    with fresh_redis.client() as client:
        client.hset(state, "n", str(last))
        client.pexpire(state, 60_000)
        ticket = client.eval(scripts.ISSUE.source, 1, state, 5_000_000, "x:1")
        assert ticket == last + 1
        assert client.hget(state, "n") == str(last + 1)
        assert client.hget(state, "h") == str(last + 1)
        # The release keeps the counter alone while the clock has not passed it.
        assert client.eval(scripts.RELEASE.source, 1, state, str(ticket), "0", "") == 1
        assert client.hgetall(state) == {"n": str(last + 1)}
        assert client.pttl(state) > 0


# -- 5. timing on the client's clock


async def test_wait_timeout_is_kept_within_20ms_whatever_the_server_tick(slow_tick: RedisProcess) -> None:
    store = RedisLockStore(slow_tick.url(), key_prefix=PREFIX, lifetime=5)
    try:
        async with store.lock("deadline"):
            for timeout in (0.001, 0.01, 0.05):
                late = []
                for _ in range(5):
                    started = time.monotonic()
                    with pytest.raises(LockTimeoutError):
                        async with store.lock("deadline", wait_timeout=timeout):
                            pytest.fail("granted while held")
                    late.append(time.monotonic() - started - timeout)
                assert statistics.median(late) < 0.02, (timeout, late)
    finally:
        await store.aclose()
    await _until_no_keys(slow_tick)


async def test_a_short_socket_timeout_does_not_fail_a_healthy_wait(slow_tick: RedisProcess) -> None:
    holders = RedisLockStore(slow_tick.url(), key_prefix=PREFIX, lifetime=5)
    waiters = RedisLockStore(slow_tick.url(), key_prefix=PREFIX, lifetime=5, socket_timeout=0.1)
    try:
        holder = holders.lock("patient")
        await holder.__aenter__()
        tasks = [asyncio.create_task(_hold(waiters, "patient")) for _ in range(5)]
        await asyncio.sleep(1.5)  # many times the socket timeout, and past a server tick
        early = [task.exception() for task in tasks if task.done()]
        assert early == []
        await holder.__aexit__(None, None, None)
        tickets = await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert len(set(tickets)) == 5
    finally:
        await holders.aclose()
        await waiters.aclose()
    await _until_no_keys(slow_tick)


async def test_a_hung_holders_lease_end_is_noticed_within_20ms(slow_tick: RedisProcess) -> None:
    store = RedisLockStore(slow_tick.url(), key_prefix=PREFIX, lifetime=5)
    late = []
    try:
        for attempt in range(3):
            conversation_id = f"hung:{attempt}"
            _, _, received = _dead_ticket(slow_tick, conversation_id, lease=0.3)
            started = time.monotonic()
            async with store.lock(conversation_id):
                granted = time.monotonic()
            assert granted - started > 0.2
            late.append(granted - (received + 0.3))
    finally:
        await store.aclose()
    assert statistics.median(late) < 0.02, late
    await _until_no_keys(slow_tick)


# -- 6. force_release and this store's holds


@pytest.mark.parametrize("renew", [True, False])
async def test_force_release_marks_every_revoked_hold_of_this_store_lost(
    fresh_redis: RedisProcess, renew: bool
) -> None:
    store = RedisLockStore(fresh_redis.url(), key_prefix=PREFIX, lifetime=5)
    try:
        async with store.lock("forced", renew=renew) as held:
            assert not held.lost
            assert await store.force_release("forced") == held.ticket
            assert held.lost
        assert await store.inspect("forced") is None
    finally:
        await store.aclose()
    await _until_no_keys(fresh_redis)
