"""A bench child process: contends for locks from another process, on command.

Run as ``python -m convlock.bench.worker``. It prints ``ready``, then reads
one JSON command per line from stdin and answers each with one JSON line,
``{"result": ...}`` or ``{"error": "..."}``; it exits when stdin closes.
Commands carry ``start_at``, a time on the host-wide monotonic clock, so
that several workers begin together (``rasa`` instead waits at a barrier
until every worker has connected); the times they report are on that
clock too, so the parent can order holds across processes.

Commands (``op``):

* ``handoff``: ``rounds`` holds of ``hold`` seconds on one lock with
  ``lib`` = ``convlock`` | ``redis-py`` | ``python-redis-lock``; answers
  ``[[granted, release_started, pid], ...]``;
* ``throughput``: ``conversations`` tasks, each cycling its own conversation
  (``kind`` = ``lock``) or calling ``EVALSHA`` of ``return 1`` (``kind`` =
  ``evalsha``) for ``seconds``; answers cycles (or calls) per second;
* ``rasa``: the Rasa workload (a non-atomic read-modify-write of a counter
  under ``async with store.lock(...)``, store built by Rasa's factory from
  ``endpoints``); answers holds, ``LockError`` count and unfinished count
  (see :func:`rasa`; the Rasa integration tests drive it too).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
import traceback
from typing import Any

from .measure import unpin

__all__ = ["main"]

_LIFETIME = 30


async def _until(start_at: float) -> None:
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))


async def handoff(command: dict[str, Any]) -> list[list[float]]:
    """Hold one lock ``rounds`` times, competing with the other workers."""
    lib, url, name = command["lib"], command["url"], command["name"]
    rounds, hold, deadline = command["rounds"], command["hold"], command["deadline"]
    records: list[list[float]] = []
    pid = float(os.getpid())
    if lib == "python-redis-lock":
        return await asyncio.to_thread(_handoff_python_redis_lock, command)
    if lib == "convlock":
        from ..redis import RedisLockStore

        store = RedisLockStore(url, key_prefix=command["prefix"], lifetime=_LIFETIME)
        try:
            await store.ping()
            await _until(command["start_at"])
            stop = time.monotonic() + deadline
            for _ in range(rounds):
                if time.monotonic() > stop:
                    break
                held = store.lock(name)
                await held.__aenter__()
                granted = time.monotonic()
                await asyncio.sleep(hold)
                releasing = time.monotonic()
                await held.__aexit__(None, None, None)
                records.append([granted, releasing, pid])
        finally:
            await store.aclose()
        return records
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        await client.ping()
        await _until(command["start_at"])
        stop = time.monotonic() + deadline
        for _ in range(rounds):
            remaining = stop - time.monotonic()
            if remaining <= 0:
                break
            # redis-py's defaults: it polls every 0.1 s while the lock is taken.
            lock = client.lock(f"{command['prefix']}:{name}", timeout=_LIFETIME, blocking_timeout=remaining)
            if not await lock.acquire():
                break
            granted = time.monotonic()
            await asyncio.sleep(hold)
            releasing = time.monotonic()
            await lock.release()
            records.append([granted, releasing, pid])
    finally:
        await client.aclose()
    return records


def _handoff_python_redis_lock(command: dict[str, Any]) -> list[list[float]]:
    import redis
    import redis_lock

    client = redis.Redis.from_url(command["url"])
    records: list[list[float]] = []
    pid = float(os.getpid())
    try:
        client.ping()
        time.sleep(max(0.0, command["start_at"] - time.monotonic()))
        stop = time.monotonic() + command["deadline"]
        for _ in range(command["rounds"]):
            remaining = stop - time.monotonic()
            if remaining <= 1:
                break
            lock = redis_lock.Lock(client, f"{command['prefix']}:{command['name']}", expire=_LIFETIME)
            # It refuses a timeout longer than the lock's expiry.
            if not lock.acquire(blocking=True, timeout=min(int(remaining), _LIFETIME)):
                break
            granted = time.monotonic()
            time.sleep(command["hold"])
            releasing = time.monotonic()
            lock.release()
            records.append([granted, releasing, pid])
    finally:
        client.close()
    return records


async def throughput(command: dict[str, Any]) -> float:
    """Cycles (or EVALSHA calls) per second of ``conversations`` concurrent tasks over ``seconds``."""
    url, count, seconds = command["url"], command["conversations"], command["seconds"]
    done = 0
    if command["kind"] == "lock":
        from ..redis import RedisLockStore

        store = RedisLockStore(url, key_prefix=command["prefix"], lifetime=_LIFETIME)

        async def lock_task(index: int, end: float) -> None:
            nonlocal done
            name = f"c{index}"
            while time.monotonic() < end:
                async with store.lock(name):
                    pass
                done += 1

        try:
            for _ in range(5):  # warm up: connections and scripts
                async with store.lock("warm-up"):
                    pass
            await _until(command["start_at"])
            start = time.monotonic()
            await asyncio.gather(*(lock_task(i, start + seconds) for i in range(count)))
            # The last cycles end after the deadline: divide by the time they took.
            return done / (time.monotonic() - start)
        finally:
            await store.aclose()
    import redis.asyncio as aioredis

    # The lock store's default cap on connections (max_connections: 50), so
    # both sides of the ratio get the same number of sockets.
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=50, timeout=None)
    client = aioredis.Redis(connection_pool=pool)

    async def evalsha_task(sha: str, end: float) -> None:
        nonlocal done
        while time.monotonic() < end:
            await client.evalsha(sha, 0)
            done += 1

    try:
        sha = await client.script_load("return 1")
        await _until(command["start_at"])
        start = time.monotonic()
        await asyncio.gather(*(evalsha_task(sha, start + seconds) for _ in range(count)))
        return done / (time.monotonic() - start)
    finally:
        await client.aclose()
        await pool.disconnect()


async def _barrier(client: Any, key: str, parties: int, timeout: float) -> None:
    """Wait until ``parties`` processes have counted themselves in at ``key`` (a Redis counter)."""
    await client.incr(key)
    give_up = time.monotonic() + timeout
    while (arrived := int(await client.get(key) or 0)) < parties:
        if time.monotonic() > give_up:
            raise TimeoutError(f"only {arrived} of {parties} processes reached the start within {timeout:g}s")
        await asyncio.sleep(0.001)


async def rasa(command: dict[str, Any]) -> dict[str, Any]:
    """The Rasa workload on a store built by Rasa's factory (see the module docstring).

    ``messages`` messages on ``conversation``, ``tasks`` at a time (a Rasa
    server handles many requests at once; default 1). The messages start
    once ``parties`` processes (default 1) have connected (a barrier on the
    counter ``<counter_key>:ready``, which the caller clears). Each holds Rasa's lock
    while it does a non-atomic read-modify-write of the counter at
    ``counter_key`` in the Redis at ``url``. Past ``deadline`` seconds the
    messages still waiting are cancelled and counted as unfinished: Rasa's
    stores can stall for a whole lock lifetime. Answers ``holds``
    (``[ticket, start, end, pid]``; ticket is convlock's fencing token, None
    for Rasa's own stores), ``lock_errors`` (messages Rasa would drop),
    ``unfinished``, ``elapsed`` and ``error`` (what else went wrong, or None).
    Used by scenario 8 and by ``tests/test_rasa_integration.py``.
    """
    import redis.asyncio as aioredis
    import structlog

    # Rasa's stores log every step at debug level; a Rasa server filters that out.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    from rasa.core.lock_store import LockError, LockStore
    from rasa.utils.endpoints import read_endpoint_config

    store = LockStore.create(read_endpoint_config(command["endpoints"], "lock_store"))
    counters = aioredis.Redis.from_url(command["url"])
    key = command["counter_key"]
    holds: list[list[Any]] = []
    lock_errors = 0
    queue = list(range(command["messages"]))

    async def one_message() -> None:
        nonlocal lock_errors
        try:
            async with store.lock(command["conversation"], wait_time_in_seconds=0.01) as lock:
                start = time.monotonic()
                value = int(await counters.get(key) or 0)  # deliberately not atomic
                await asyncio.sleep(command["hold"])
                await counters.set(key, value + 1)
                holds.append([getattr(lock, "ticket", None), start, time.monotonic(), os.getpid()])
        except LockError:
            lock_errors += 1  # Rasa drops such a message

    async def task() -> None:
        while queue:
            queue.pop()
            await one_message()

    # Connect first, on a conversation of this process's own, then wait for
    # the other replicas to have done the same: a store connects on first
    # use, and through Sentinel that (asking the sentinels for the master,
    # then connecting) once took longer than the other replica needed for all
    # its messages, so that the two never contended.
    async with store.lock(f"{command['conversation']}-warm-{os.getpid()}", wait_time_in_seconds=0.01):
        pass
    await _barrier(counters, f"{key}:ready", command.get("parties", 1), command["deadline"])
    started = time.monotonic()
    error = None
    tasks = [asyncio.ensure_future(task()) for _ in range(command.get("tasks", 1))]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), command["deadline"])
    except TimeoutError:
        pass  # the unfinished messages are counted below
    except Exception:  # reported, so that the parent shows why
        error = traceback.format_exc(limit=5)
    elapsed = time.monotonic() - started
    await counters.aclose()
    close = getattr(store, "aclose", None)
    if close is not None:
        await close()
    return {
        "holds": holds,
        "lock_errors": lock_errors,
        "unfinished": command["messages"] - len(holds) - lock_errors,
        "elapsed": elapsed,
        "error": error,
    }


_OPS = {"handoff": handoff, "throughput": throughput, "rasa": rasa}


def main() -> None:
    """Answer commands from stdin until it closes."""
    unpin()  # the parent may be pinned to one CPU; a worker runs anywhere
    # Answers go to the real stdout only: libraries (Rasa's logging) may print.
    answers = sys.stdout
    sys.stdout = sys.stderr
    print("ready", file=answers, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        try:
            answer: dict[str, Any] = {"result": asyncio.run(_OPS[command["op"]](command))}
        except Exception:
            answer = {"error": traceback.format_exc(limit=8)}
        print(json.dumps(answer), file=answers, flush=True)


if __name__ == "__main__":
    main()
