"""Behaviour of InMemoryLockStore under real asyncio concurrency."""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import pytest

from convlock import (
    ConfigError,
    InMemoryLockStore,
    LockError,
    LockLostError,
    LockTimeoutError,
)
from convlock.store import LIFETIME_ENV
from store_contract import check_granted_at_once


async def test_100_tasks_hold_disjoint_intervals_in_ticket_order() -> None:
    store = InMemoryLockStore()
    intervals: list[tuple[float, float, int]] = []
    grants: list[int] = []
    counter = 0

    async def worker() -> None:
        nonlocal counter
        for _ in range(5):
            async with store.lock("conv") as held:
                grants.append(held.ticket)
                start = time.monotonic()
                value = counter
                await asyncio.sleep(random.choice([0, 0, 0.0005]))  # a non-atomic update
                counter = value + 1
                intervals.append((start, time.monotonic(), held.ticket))
            await asyncio.sleep(0)

    await asyncio.gather(*(worker() for _ in range(100)))
    assert counter == 500, "a lost update means two holders overlapped"
    intervals.sort()
    for (_, end, _), (start, _, _) in itertools.pairwise(intervals):
        assert end <= start, "hold intervals overlap"
    assert grants == sorted(grants), "grants must follow ticket order"
    assert await store.inspect("conv") is None
    assert store.statistics()["conversations"] == 0


async def test_waiters_are_served_in_arrival_order() -> None:
    store = InMemoryLockStore()
    order: list[int] = []
    first = store.lock("c")
    await first.__aenter__()

    async def waiter(i: int) -> None:
        async with store.lock("c"):
            order.append(i)

    tasks = []
    for i in range(10):
        tasks.append(asyncio.create_task(waiter(i)))
        await asyncio.sleep(0)  # let it draw its ticket before the next one
    snapshot = await store.inspect("c")
    assert snapshot is not None
    assert snapshot.serving is not None
    assert snapshot.serving.ticket == first.ticket
    assert [lease.ticket for lease in snapshot.waiting] == sorted(lease.ticket for lease in snapshot.waiting)
    assert len(snapshot.waiting) == 10
    await first.__aexit__(None, None, None)
    await asyncio.gather(*tasks)
    assert order == list(range(10))


async def test_conversations_are_independent() -> None:
    store = InMemoryLockStore()
    async with store.lock("a"):
        # Another conversation is not blocked by "a".
        async with asyncio.timeout(1):
            async with store.lock("b"):
                ids = sorted([cid async for cid in store.conversations()])
                assert ids == ["a", "b"]


async def test_lapsed_lease_lets_the_next_waiter_in() -> None:
    store = InMemoryLockStore()
    served_at: list[float] = []
    holder = store.lock("c", lifetime=0.2, renew=False)
    await holder.__aenter__()
    start = time.monotonic()

    async def waiter() -> None:
        async with store.lock("c") as held:
            served_at.append(time.monotonic())
            assert not held.lost

    task = asyncio.create_task(waiter())
    await asyncio.wait_for(task, timeout=5)
    assert served_at[0] - start >= 0.15, "served before the lease lapsed"
    assert holder.lost
    with pytest.raises(LockLostError, match="lost"):
        await holder.ensure()
    await holder.__aexit__(None, None, None)  # the stale release must not disturb anything
    assert await store.inspect("c") is None
    assert store.statistics()["lapsed_leases"] == 1


async def test_renewing_holder_outlives_its_lifetime() -> None:
    store = InMemoryLockStore()
    async with store.lock("c", lifetime=0.1) as held:
        waiter = asyncio.create_task(_acquire_release(store, "c"))
        await asyncio.sleep(0.35)
        assert not held.lost
        await held.ensure()
        assert not waiter.done(), "a renewing lease must not lapse while its owner lives"
    await asyncio.wait_for(waiter, 2)


async def _acquire_release(store: InMemoryLockStore, cid: str, **kwargs: float) -> int:
    async with store.lock(cid, **kwargs) as held:  # type: ignore[arg-type]
        return held.ticket


async def test_wait_timeout_raises_and_withdraws_the_ticket() -> None:
    store = InMemoryLockStore()
    async with store.lock("c"):
        with pytest.raises(LockTimeoutError) as info:
            await _acquire_release(store, "c", wait_timeout=0.05)
        assert isinstance(info.value, TimeoutError)
        assert info.value.conversation_id == "c"
        snapshot = await store.inspect("c")
        assert snapshot is not None
        assert snapshot.waiting == ()
    assert await store.inspect("c") is None


async def test_store_default_wait_timeout() -> None:
    store = InMemoryLockStore(wait_timeout=0.05)
    async with store.lock("c"):
        with pytest.raises(LockTimeoutError):
            await _acquire_release(store, "c")


async def test_cancelling_a_waiter_does_not_stall_the_queue() -> None:
    store = InMemoryLockStore()
    holder = store.lock("c")
    await holder.__aenter__()
    doomed = asyncio.create_task(_acquire_release(store, "c"))
    await asyncio.sleep(0)
    behind = asyncio.create_task(_acquire_release(store, "c"))
    await asyncio.sleep(0)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    snapshot = await store.inspect("c")
    assert snapshot is not None
    assert len(snapshot.waiting) == 1
    await holder.__aexit__(None, None, None)
    assert await asyncio.wait_for(behind, 1) > holder.ticket
    assert await store.inspect("c") is None


async def test_cancelled_just_after_being_granted_passes_the_lock_on() -> None:
    store = InMemoryLockStore()
    holder = store.lock("c")
    await holder.__aenter__()
    granted_then_cancelled = asyncio.create_task(_acquire_release(store, "c"))
    await asyncio.sleep(0)
    behind = asyncio.create_task(_acquire_release(store, "c"))
    await asyncio.sleep(0)
    # Release (which grants the next waiter) and cancel it before it runs.
    await holder.__aexit__(None, None, None)
    granted_then_cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await granted_then_cancelled
    assert await asyncio.wait_for(behind, 1) > 0
    assert await store.inspect("c") is None


async def test_exception_inside_the_block_releases() -> None:
    store = InMemoryLockStore()
    with pytest.raises(RuntimeError, match="boom"):
        async with store.lock("c"):
            raise RuntimeError("boom")
    assert await store.inspect("c") is None
    async with asyncio.timeout(1):
        await _acquire_release(store, "c")


async def test_tickets_increase_after_the_conversation_went_idle() -> None:
    store = InMemoryLockStore()
    first = await _acquire_release(store, "c")
    assert await store.inspect("c") is None
    second = await _acquire_release(store, "c")
    assert second > first


async def test_nothing_is_left_in_memory_when_idle() -> None:
    store = InMemoryLockStore()
    holder = store.lock("c", lifetime=5, renew=False)
    await holder.__aenter__()
    waiters = [asyncio.create_task(_acquire_release(store, "c")) for _ in range(3)]
    await asyncio.sleep(0)
    assert store.statistics()["expiry_timers"] == 1, "a finite lease with waiters arms one timer"
    await holder.__aexit__(None, None, None)
    await asyncio.gather(*waiters)
    stats = store.statistics()
    assert stats["conversations"] == 0
    assert stats["waiting"] == 0
    assert stats["expiry_timers"] == 0
    assert store._book.heads == {}
    assert store._timers == {}


async def test_force_release_revokes_the_holder() -> None:
    store = InMemoryLockStore()
    assert await store.force_release("c") is None
    holder = store.lock("c")
    await holder.__aenter__()
    waiter = asyncio.create_task(_acquire_release(store, "c"))
    await asyncio.sleep(0)
    assert await store.force_release("c") == holder.ticket
    assert await asyncio.wait_for(waiter, 1) > holder.ticket
    assert holder.lost
    with pytest.raises(LockLostError):
        await holder.ensure()
    await holder.__aexit__(None, None, None)
    assert await store.inspect("c") is None


async def test_inspect_reports_leases() -> None:
    store = InMemoryLockStore(lifetime=30)
    async with store.lock("c", lifetime=2, renew=False) as held:
        snapshot = await store.inspect("c")
        assert snapshot is not None
        assert snapshot.serving is not None
        assert snapshot.serving.ticket == held.ticket
        assert 1.5 < snapshot.serving.expires_in <= 2
        assert snapshot.as_dict()["serving"]["ticket"] == held.ticket
    async with store.lock("c"):
        snapshot = await store.inspect("c")
        assert snapshot is not None
        assert snapshot.serving is not None
        assert snapshot.serving.expires_in == 30, "a renewing lease shows a full lifetime"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("", "empty"),
        ("x" * 4097, "4096"),
        ("é" * 2049, "4096"),
        (42, "int"),
        (None, "NoneType"),
        ("\ud800", "surrogate"),
    ],
)
async def test_invalid_conversation_ids_are_refused(bad: object, message: str) -> None:
    store = InMemoryLockStore()
    with pytest.raises(ValueError, match=message):
        store.lock(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        await store.inspect(bad)  # type: ignore[arg-type]


async def test_longest_valid_ids_are_accepted() -> None:
    store = InMemoryLockStore()
    for cid in ("x" * 4096, "é" * 2048, "😀" * 1024, ":*{}"):
        async with store.lock(cid) as held:
            assert held.conversation_id == cid


@pytest.mark.parametrize(("kwargs", "message"), [({"lifetime": 0}, "lifetime"), ({"wait_timeout": -1}, "wait")])
def test_bad_durations_are_refused(kwargs: dict[str, float], message: str) -> None:
    store = InMemoryLockStore()
    with pytest.raises(ValueError, match=message):
        store.lock("c", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        InMemoryLockStore(**kwargs)


def test_lifetime_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LIFETIME_ENV, "7.5")
    assert InMemoryLockStore().lifetime == 7.5
    monkeypatch.delenv(LIFETIME_ENV)
    assert InMemoryLockStore().lifetime == 60
    monkeypatch.setenv(LIFETIME_ENV, "soon")
    with pytest.raises(ConfigError, match=LIFETIME_ENV):
        InMemoryLockStore()


async def test_a_closed_store_refuses_new_locks() -> None:
    store = InMemoryLockStore()
    async with store:
        pass
    with pytest.raises(LockError, match="closed"):
        await _acquire_release(store, "c")


async def test_a_lock_context_enters_once() -> None:
    store = InMemoryLockStore()
    context = store.lock("c")
    async with context:
        pass
    with pytest.raises(RuntimeError, match="once"):
        async with context:
            pass


async def test_randomised_workload_keeps_fifo_per_conversation() -> None:
    """Many conversations, random holds, timeouts and cancellations at once."""
    store = InMemoryLockStore()
    rng = random.Random(7)
    holders: dict[str, int] = {}
    grants: dict[str, list[int]] = {}

    async def one(cid: str) -> None:
        try:
            async with store.lock(cid, wait_timeout=rng.choice([None, 0.002])) as held:
                assert holders.get(cid) is None, "two holders at once"
                holders[cid] = held.ticket
                grants.setdefault(cid, []).append(held.ticket)
                await asyncio.sleep(rng.choice([0, 0.001]))
                del holders[cid]
        except LockTimeoutError:
            pass

    tasks = [asyncio.create_task(one(rng.choice("abcd"))) for _ in range(400)]
    for task in rng.sample(tasks, 40):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for cid, order in grants.items():
        assert order == sorted(order), cid
    assert store.statistics()["conversations"] == 0


async def test_a_hold_tells_whether_it_was_granted_at_once() -> None:
    await check_granted_at_once(InMemoryLockStore(), "g", lambda: asyncio.sleep(0.01))
