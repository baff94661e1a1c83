"""Bursts against a real redis-server: bounded connections, in-process hand-off, shared wake-ups.

One hot conversation must not exhaust a process: every waiting ``lock()``
once held its own pooled connection in ``BLPOP``, so 100 waiters anywhere in
a process made every other conversation fail. These tests count the
connections the server sees while a burst runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from convlock.redis import RedisLockStore
from redis_procs import ClusterSetup, RedisProcess

HOT = "hot"
WORKER = Path(__file__).with_name("redis_worker_burst.py")


class _PeakClients:
    """Samples ``connected_clients`` in a thread while a burst runs; ``peak`` excludes the sampler."""

    def __init__(self, proc: RedisProcess) -> None:
        self._proc = proc
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self._proc.client() as client:
            while not self._stop.is_set():
                clients = int(client.info("clients")["connected_clients"]) - 1
                self.peak = max(self.peak, clients)
                time.sleep(0.005)

    def __enter__(self) -> _PeakClients:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def burst_redis(fresh_redis: RedisProcess) -> RedisProcess:
    """A server of its own, so that every client it counts is the test's."""
    return fresh_redis


def _keys(proc: RedisProcess) -> list[str]:
    with proc.client() as client:
        return sorted(str(key) for key in client.scan_iter(count=1000))


async def _until_no_keys(proc: RedisProcess, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while _keys(proc):
        assert time.monotonic() < deadline, f"keys left: {_keys(proc)[:5]}"
        await asyncio.sleep(0.02)


async def test_a_thousand_waiters_on_one_conversation_keep_connections_bounded(
    burst_redis: RedisProcess,
) -> None:
    store = RedisLockStore(burst_redis.url(), key_prefix="b", lifetime=30, socket_timeout=10)
    assert store.max_connections == 50
    grants: dict[str, list[int]] = {}

    async def one(conversation_id: str) -> None:
        async with store.lock(conversation_id) as held:
            grants.setdefault(conversation_id, []).append(held.ticket)
            await asyncio.sleep(0)

    calls = [one(HOT) for _ in range(1000)]
    calls += [one(f"other:{i}") for i in range(100) for _ in range(2)]
    try:
        with _PeakClients(burst_redis) as clients:
            results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 120)
    finally:
        stats = dict(store.statistics())
        await store.aclose()
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == [], f"{len(failures)} calls failed, first: {failures[:1]}"
    assert len(grants[HOT]) == 1000
    assert all(len(grants[f"other:{i}"]) == 2 for i in range(100))
    for conversation_id, tickets in grants.items():
        assert tickets == sorted(tickets), f"{conversation_id} was not served in ticket order"
    assert clients.peak <= 64, f"the process opened {clients.peak} connections"
    # Every waiter was served in-process: nothing had to wake from Redis.
    assert stats["local_handoffs"] >= 999
    assert stats["wakeups"] == 0
    await _until_no_keys(burst_redis)


def _start_worker(config: dict[str, Any]) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(WORKER.parent), *sys.path]))
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), json.dumps(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.slow
async def test_two_processes_share_a_hot_conversation_with_bounded_connections(
    burst_redis: RedisProcess,
) -> None:
    config = {
        "url": burst_redis.url(),
        "prefix": "b2",
        "hot": HOT,
        "hot_calls": 500,
        "others": 50,
        "log": "b2-log",
    }
    workers = [_start_worker(config) for _ in range(2)]
    with _PeakClients(burst_redis) as clients:
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        outputs = []
        for worker in workers:
            out, _ = await asyncio.to_thread(worker.communicate, timeout=120)
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    for output in outputs:
        assert output["failures"] == [], output["failures"][:3]
        assert output["granted"] == 500 + 2 * 50
    with burst_redis.client() as client:
        log = [int(ticket) for ticket in client.lrange("b2-log", 0, -1)]
        client.delete("b2-log")
    # The log is appended inside the lock, so its order is the grant order
    # across both processes: it must be the ticket order.
    assert len(log) == 1000
    assert log == sorted(log)
    # Both processes handed over to each other through Redis wake-ups.
    assert sum(output["stats"]["wakeups"] for output in outputs) > 0
    assert clients.peak <= 2 * 64, f"two processes opened {clients.peak} connections"
    await _until_no_keys(burst_redis)


async def test_short_commands_are_not_starved_by_waiters_of_other_processes(
    burst_redis: RedisProcess,
) -> None:
    """Waiters of remote holders share a few readers; draws elsewhere still go through at once."""
    holders = RedisLockStore(burst_redis.url(), key_prefix="s", lifetime=30)
    waiters = RedisLockStore(burst_redis.url(), key_prefix="s", lifetime=30, max_connections=10)
    held = [holders.lock(f"c{i}") for i in range(40)]
    for hold in held:
        await hold.__aenter__()
    served: list[str] = []

    async def wait_for(conversation_id: str) -> None:
        async with waiters.lock(conversation_id):
            served.append(conversation_id)

    try:
        with _PeakClients(burst_redis) as clients:
            tasks = [asyncio.create_task(wait_for(f"c{i}")) for i in range(40)]
            await asyncio.sleep(0.3)
            # 40 conversations wait on another "process": the waiting store
            # stays within its 10 connections, and a draw on a free
            # conversation is served at once.
            started = time.monotonic()
            async with waiters.lock("free"):
                pass
            assert time.monotonic() - started < 1.0
            for hold in held:
                await hold.__aexit__(None, None, None)
            # Within a few fallback polls (50 ms each), not at the waiting lease's
        # renewal (lifetime/3 = 10 s), which is when they used to learn of it.
        await asyncio.wait_for(asyncio.gather(*tasks), 2)
        stats = waiters.statistics()
    finally:
        await holders.aclose()
        await waiters.aclose()
    assert sorted(served) == sorted(f"c{i}" for i in range(40))
    assert stats["wakeups"] >= 1
    assert stats["wakeup_readers"] <= 2
    # The holders' store used a few connections; the waiting store at most 10.
    assert clients.peak <= 10 + 10, clients.peak
    await _until_no_keys(burst_redis)


@pytest.mark.slow
async def test_a_waiter_over_the_reader_budget_is_served_by_its_timer(redis_cluster: ClusterSetup) -> None:
    """In a Cluster one blocking read covers one hash slot: past the budget, waiters poll."""
    prefix = f"ob{os.getpid()}"
    settings_url = redis_cluster.nodes[0]
    from convlock import RedisSettings

    settings = RedisSettings(
        url=settings_url.host,
        port=settings_url.port,
        deployment_mode="cluster",
        key_prefix=prefix,
        max_connections=5,  # one reader
    )
    holders = RedisLockStore(settings, lifetime=30)
    waiters = RedisLockStore(settings, lifetime=30)
    # Conversations whose keys fall in different slots.
    ids = [f"user:{i}" for i in range(6)]
    held = [holders.lock(c) for c in ids]
    for hold in held:
        await hold.__aenter__()
    order: list[str] = []

    async def wait_for(conversation_id: str) -> None:
        async with waiters.lock(conversation_id):
            order.append(conversation_id)

    try:
        tasks = [asyncio.create_task(wait_for(c)) for c in ids]
        await asyncio.sleep(0.3)
        for hold in held:
            await hold.__aexit__(None, None, None)
        # Within a few fallback polls (50 ms each), not at the waiting lease's
        # renewal (lifetime/3 = 10 s), which is when they used to learn of it.
        await asyncio.wait_for(asyncio.gather(*tasks), 2)
        stats = waiters.statistics()
    finally:
        await holders.aclose()
        await waiters.aclose()
    assert sorted(order) == sorted(ids)
    assert stats["fallback_waits"] >= 1, "some waiter should have been over the budget"
    assert stats["wakeup_readers"] <= 1
