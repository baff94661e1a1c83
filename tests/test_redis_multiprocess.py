"""RedisLockStore across OS processes: exclusion, ticket order, crash recovery, fencing."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from convlock.redis import RedisLockStore
from redis_procs import RedisProcess

HERE = Path(__file__).resolve().parent
PREFIX = "mp"
PROCESSES = 4
CONVERSATIONS = ["conv:a", "conv:{b}", "conv:ü"]
CYCLES = 100

pytestmark = pytest.mark.slow


def _convlock_keys(proc: RedisProcess) -> list[str]:
    with proc.client() as client:
        return list(client.scan_iter(match=f"{PREFIX}:*", count=1000))


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=HERE,
    )


def test_processes_exclude_each_other_and_follow_ticket_order(redis_server: RedisProcess) -> None:
    config = {
        "url": redis_server.url(),
        "prefix": PREFIX,
        "counter_prefix": "counter",
        "conversations": CONVERSATIONS,
        "cycles": CYCLES,
        "sleep": 0.0005,
    }
    workers = [_spawn(str(HERE / "redis_worker_counter.py"), json.dumps(config)) for _ in range(PROCESSES)]
    try:
        for worker in workers:
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "ready", worker.stderr.read() if worker.stderr else ""
        for worker in workers:  # start together, so that they contend
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        results = [worker.communicate(timeout=100) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    holds: list[list[Any]] = []
    for worker, (out, err) in zip(workers, results, strict=True):
        assert worker.returncode == 0, err
        holds += json.loads(out.strip().splitlines()[-1])["holds"]

    by_conversation: dict[str, list[list[Any]]] = defaultdict(list)
    for hold in holds:
        by_conversation[hold[0]].append(hold)
    assert sorted(by_conversation) == sorted(CONVERSATIONS)
    for conversation_id, conv_holds in by_conversation.items():
        # Exact counts: no increment was lost to an overlapping holder.
        assert redis_server.command("GET", f"counter:{conversation_id}") == str(PROCESSES * CYCLES)
        assert len(conv_holds) == PROCESSES * CYCLES
        conv_holds.sort(key=lambda hold: hold[2])
        for earlier, later in itertools.pairwise(conv_holds):
            assert earlier[3] <= later[2], f"{conversation_id}: holds {earlier} and {later} overlap"
            assert earlier[1] < later[1], f"{conversation_id}: ticket {later[1]} served after {earlier[1]}"
        # Tickets are unique, every process took part, and the lock passed
        # between processes many times: it really was contended.
        assert len({hold[1] for hold in conv_holds}) == len(conv_holds)
        assert len({hold[4] for hold in conv_holds}) == PROCESSES
        switches = sum(a[4] != b[4] for a, b in itertools.pairwise(conv_holds))
        assert switches >= 10, f"{conversation_id}: only {switches} hand-offs between processes"
    assert _convlock_keys(redis_server) == []


async def test_a_killed_holder_is_replaced_within_one_lease(redis_server: RedisProcess) -> None:
    lifetime = 1.0
    holder = _spawn(str(HERE / "redis_worker_holder.py"), redis_server.url(), PREFIX, "crash", str(lifetime))
    store = RedisLockStore(redis_server.url(), key_prefix=PREFIX, lifetime=5, socket_timeout=2)
    try:
        assert holder.stdout is not None
        line = await asyncio.to_thread(holder.stdout.readline)
        assert line.startswith("held "), holder.stderr.read() if holder.stderr else line
        killed_ticket = int(line.split()[1])
        # Held longer than its lifetime: the other process renews it.
        await asyncio.sleep(lifetime * 1.5)
        snapshot = await store.inspect("crash")
        assert snapshot is not None
        assert snapshot.serving is not None
        assert snapshot.serving.ticket == killed_ticket

        waiter = asyncio.create_task(_acquire_and_release(store, "crash"))
        for _ in range(500):
            if await _has_waiter(store, "crash"):
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the waiter never queued")
        os.kill(holder.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        holder.wait(5)
        ticket, granted_at = await asyncio.wait_for(waiter, lifetime * 5)
        # Served within one lease of the death (plus scheduling slack), by the
        # waiter's own timer: nobody released.
        assert granted_at - killed_at <= lifetime + 0.5
        # The dead holder's fencing token is lower than every later one.
        assert ticket > killed_ticket
        async with store.lock("crash") as later:
            assert later.ticket > ticket
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        await store.aclose()
    assert _convlock_keys(redis_server) == []


async def _acquire_and_release(store: RedisLockStore, conversation_id: str) -> tuple[int, float]:
    async with store.lock(conversation_id) as held:
        return held.ticket, time.monotonic()


async def _has_waiter(store: RedisLockStore, conversation_id: str) -> bool:
    snapshot = await store.inspect(conversation_id)
    return snapshot is not None and bool(snapshot.waiting)
