"""Lock observers: metric values and log records after a known sequence of lock operations."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from convlock import InMemoryLockStore, LockLostError, LockTimeoutError
from convlock.metrics import LockMetrics
from convlock.observe import LockEventLog
from convlock.redis import RedisLockStore
from convlock.store import LockStore
from redis_procs import RedisProcess, free_port


def value(registry: CollectorRegistry, name: str) -> float:
    found = registry.get_sample_value(name)
    assert found is not None, name
    return found


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` (a metric the store's tasks move) until it holds."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110  (a metric has no event to wait on)
            await asyncio.sleep(0.005)


async def contended_handoff(store: LockStore, cid: str, registry: CollectorRegistry) -> None:
    """A holder, two waiters queued behind it (the gauge shows 2), then all served in turn."""
    order: list[int] = []
    async with store.lock(cid) as held:
        order.append(held.ticket)

        async def wait() -> None:
            async with store.lock(cid) as mine:
                order.append(mine.ticket)

        tasks = [asyncio.create_task(wait()) for _ in range(2)]
        await until(lambda: value(registry, "convlock_lock_waiting_tickets") == 2)
    await asyncio.gather(*tasks)
    assert order == sorted(order)


@pytest.mark.parametrize("one_loop", [False, True], ids=["shared", "one-loop"])
async def test_memory_store_metrics_after_a_known_sequence(one_loop: bool) -> None:
    registry = CollectorRegistry()
    store = InMemoryLockStore(lifetime=10)
    store.add_observer(LockMetrics(registry, one_loop=one_loop))

    for _ in range(2):  # 2 grants at once
        async with store.lock("alice"):
            await asyncio.sleep(0.01)
    await contended_handoff(store, "bob", registry)  # 3 grants
    async with store.lock("carol"):  # 1 grant, 1 timeout
        with pytest.raises(LockTimeoutError):
            async with store.lock("carol", wait_timeout=0.05):
                pass
    async with (
        store.lock("dave", renew=False, lifetime=0.1) as short,  # 2 grants, 1 lapse
        store.lock("dave"),
    ):
        assert short.lost
    async with store.lock("erin") as forced:  # 1 grant, 1 revocation of a holder
        assert await store.force_release("erin") == forced.ticket
    async with store.lock("frank") as holder:  # 1 grant, 1 revocation of a waiter
        waiter = asyncio.create_task(store.lock("frank").__aenter__())
        await until(lambda: value(registry, "convlock_lock_waiting_tickets") == 1)
        snapshot = await store.inspect("frank")
        assert snapshot is not None
        assert await store.revoke("frank", snapshot.waiting[0].ticket) == (snapshot.waiting[0].ticket, False)
        with pytest.raises(LockLostError):
            await waiter
        assert not holder.lost

    assert value(registry, "convlock_lock_grants_total") == 10
    assert value(registry, "convlock_lock_wait_seconds_count") == 10
    assert value(registry, "convlock_lock_hold_seconds_count") == 10
    assert value(registry, "convlock_lock_hold_seconds_sum") >= 0.02  # alice held twice for 10 ms
    assert value(registry, "convlock_lock_timeouts_total") == 1
    assert value(registry, "convlock_lock_lapsed_total") == 1
    assert value(registry, "convlock_lock_revocations_total") == 2
    assert value(registry, "convlock_lock_store_errors_total") == 0
    assert value(registry, "convlock_lock_waiting_tickets") == 0
    text = generate_latest(registry).decode()
    for cid in ("alice", "bob", "carol", "dave", "erin", "frank"):
        assert cid not in text, "no label carries a conversation ID"


def test_one_loop_metrics_read_as_prometheus_clients_own() -> None:
    """The same events fed to both kinds give the same scrape, line for line (timestamps aside)."""
    shared, one_loop = CollectorRegistry(), CollectorRegistry()
    observers = [LockMetrics(shared), LockMetrics(one_loop, one_loop=True)]
    for metrics in observers:
        for ticket, (waited, held) in enumerate([(0.0, 0.0004), (0.001, 0.02), (0.3, 7.0), (61.0, 0.0025)]):
            if waited:
                metrics.waiting("c", ticket)
            metrics.granted("c", ticket, waited, "handoff" if waited else "immediate")
            metrics.released("c", ticket, held)
        metrics.waiting("c", 9)
        metrics.timed_out("c", 9, 1.0)
        metrics.waiting("c", 10)
        metrics.abandoned("c", 10, 0.5, "cancelled")
        metrics.waiting("c", 11)
        metrics.lapsed("c", 1)
        metrics.revoked("c", 2, holder=True)
        metrics.store_error(ConnectionError("down"))

    def samples(registry: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]

    assert samples(one_loop) == samples(shared)
    assert "convlock_lock_grants_total 4.0" in samples(shared)
    assert "convlock_lock_waiting_tickets 1.0" in samples(shared)


async def test_redis_store_metrics_after_a_known_sequence(redis_server: RedisProcess) -> None:
    registry = CollectorRegistry()
    store = RedisLockStore(redis_server.url(), key_prefix="m", lifetime=5, socket_timeout=2)
    other = RedisLockStore(redis_server.url(), key_prefix="m", lifetime=5, socket_timeout=2)
    store.add_observer(LockMetrics(registry))
    try:
        async with store.lock("alice"):  # 1 grant
            pass
        await contended_handoff(store, "bob", registry)  # 3 grants
        async with store.lock("carol"):  # 1 grant, 1 timeout
            with pytest.raises(LockTimeoutError):
                async with store.lock("carol", wait_timeout=0.1):
                    pass
        async with store.lock("dave") as held:  # 1 grant; revoked by another process's store: 1 lapse
            assert await other.force_release("dave") == held.ticket
            with pytest.raises(LockLostError):
                await held.ensure()
    finally:
        await store.aclose()
        await other.aclose()
    down = RedisLockStore(f"redis://127.0.0.1:{free_port()}", socket_timeout=1)
    down.add_observer(LockMetrics(registry2 := CollectorRegistry()))
    with pytest.raises(ConnectionError):
        async with down.lock("x"):
            pass
    await down.aclose()

    assert value(registry, "convlock_lock_grants_total") == 6
    assert value(registry, "convlock_lock_wait_seconds_count") == 6
    assert value(registry, "convlock_lock_hold_seconds_count") == 6
    assert value(registry, "convlock_lock_timeouts_total") == 1
    assert value(registry, "convlock_lock_lapsed_total") == 1
    assert value(registry, "convlock_lock_revocations_total") == 0, "the revocation was another store's"
    assert value(registry, "convlock_lock_waiting_tickets") == 0
    assert value(registry2, "convlock_lock_store_errors_total") == 1


async def test_every_lock_event_is_logged_with_its_conversation_and_ticket(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = InMemoryLockStore(lifetime=10)
    store.add_observer(LockEventLog())
    registry = CollectorRegistry()
    store.add_observer(LockMetrics(registry))  # two observers: both are fed
    with caplog.at_level(logging.DEBUG, logger="convlock.locks"):
        await contended_handoff(store, "bob", registry)
        async with store.lock("carol"):
            with pytest.raises(LockTimeoutError):
                async with store.lock("carol", wait_timeout=0.02):
                    pass
    records = [r for r in caplog.records if r.name == "convlock.locks"]
    events = [(r.__dict__["event"], r.__dict__["conversation_id"], r.__dict__["ticket"]) for r in records]
    assert [e for e, cid, _ in events if cid == "bob"] == [
        "granted", "waiting", "waiting", "released", "granted", "released", "granted", "released",
    ]
    assert {e for e, cid, _ in events if cid == "carol"} == {"granted", "waiting", "timed_out", "released"}
    for record in records:
        assert f"conversation {record.__dict__['conversation_id']!r} ticket {record.__dict__['ticket']}:" in (
            record.getMessage()
        )
    woken = [r.getMessage() for r in records if "woken by the hand-off" in r.getMessage()]
    assert len(woken) == 2
    assert all(r.levelno == logging.DEBUG for r in records if r.__dict__["event"] == "granted")
    assert [r.levelno for r in records if r.__dict__["event"] == "timed_out"] == [logging.WARNING]
    assert value(registry, "convlock_lock_grants_total") == 4
