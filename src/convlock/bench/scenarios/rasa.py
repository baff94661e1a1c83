"""Scenario 8 (was bench/rasa_adapter.py): Rasa's lock stores against convlock's adapter, same workloads.

Runs only when Rasa's lock-store code is importable (``rasa.core.lock_store``);
otherwise the scenario is skipped, saying so. Every store is built as a Rasa
user's would be: ``read_endpoint_config`` on an endpoints.yml, then
``LockStore.create``.

* Uncontended: cycles/s of ``async with store.lock(sender_id)`` for
  ``ConvlockLockStore`` and for Rasa's ``RedisLockStore`` and
  ``ConcurrentRedisLockStore``, in interleaved blocks (target: convlock at
  least 3 times ``RedisLockStore``). Rasa's cycle is seven round trips on
  redis-py's sync client, convlock's two on the asyncio one, so the ratio
  cannot exceed 3.5 x (asyncio ÷ sync PING rate), which is measured in the
  same blocks and reported as the ceiling.
* Contended: 2 processes x N messages on one conversation, each a
  non-atomic read-modify-write of a counter under the lock: time taken, lost
  updates, ``LockError``s (Rasa drops those messages) and messages still
  stuck at the deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
import yaml

from ..measure import median
from ..procs import run_all
from ..report import Figure, Target
from . import Context
from .lock_redis import pinned

__all__ = ["run"]

ADAPTER = "convlock.integrations.rasa.ConvlockLockStore"
STORES = {"convlock": ADAPTER, "rasa redis": "redis", "rasa concurrent_redis": "concurrent_redis"}
CYCLES_PER_BLOCK = 50
CONVERSATION = "bench-user"


async def _cycles(store: Any, cycles: int) -> float:
    start = time.perf_counter()
    for _ in range(cycles):
        async with store.lock(CONVERSATION):
            pass
    return cycles / (time.perf_counter() - start)


async def _uncontended(files: dict[str, Path], url: str, blocks: int) -> dict[str, float]:
    from rasa.core.lock_store import LockStore
    from rasa.utils.endpoints import read_endpoint_config

    stores = {name: LockStore.create(read_endpoint_config(str(p), "lock_store")) for name, p in files.items()}
    rates: dict[str, list[float]] = {name: [] for name in [*stores, "sync PING", "async PING"]}
    sync_client = redis.Redis.from_url(url)
    async_client = aioredis.Redis.from_url(url)
    try:
        for store in stores.values():
            await _cycles(store, 20)
        for _ in range(blocks):
            for name, store in stores.items():
                rates[name].append(await _cycles(store, CYCLES_PER_BLOCK))
            start = time.perf_counter()
            for _ in range(CYCLES_PER_BLOCK):
                sync_client.ping()
            rates["sync PING"].append(CYCLES_PER_BLOCK / (time.perf_counter() - start))
            start = time.perf_counter()
            for _ in range(CYCLES_PER_BLOCK):
                await async_client.ping()
            rates["async PING"].append(CYCLES_PER_BLOCK / (time.perf_counter() - start))
    finally:
        sync_client.close()
        await async_client.aclose()
        for store in stores.values():
            close = getattr(store, "aclose", None)
            if close is not None:
                await close()
    return {name: median(values) for name, values in rates.items()}


def run(ctx: Context) -> None:
    """Scenario 8 (see the module docstring)."""
    try:
        import structlog

        # Rasa's stores log every step at debug level; a Rasa server filters that out.
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
        import rasa.core.lock_store  # noqa: F401
    except ImportError as exc:
        ctx.results.skip("rasa", "every comparison", f"Rasa's lock-store code is not importable ({exc})")
        return
    target = ctx.redis()
    folder = ctx.work / "rasa"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for index, (name, kind) in enumerate(STORES.items()):
        # Rasa's concurrent_redis store takes alphanumeric prefixes only.
        block = {**target.endpoints_block(), "type": kind, "key_prefix": f"bench{os.getpid()}rasa{index}"}
        block["host"] = block.pop("url")
        path = folder / f"endpoints-{index}.yml"
        path.write_text(yaml.safe_dump({"lock_store": block}), encoding="utf-8")
        files[name] = path
    # Rasa's server (Sanic) runs its event loop on uvloop where it is
    # installed; measure on the loop a Rasa deployment would use.
    loop_factory: Any = None
    loop_name = "asyncio"
    try:
        import uvloop

        loop_factory, loop_name = uvloop.new_event_loop, "uvloop"
    except ImportError:
        pass
    with pinned(target) as was_pinned, asyncio.Runner(loop_factory=loop_factory) as runner:
        rates = runner.run(_uncontended(files, target.url, 4 if ctx.quick else 15))
    add = ctx.results.add
    for name in ("rasa redis", "rasa concurrent_redis"):
        add(Figure("rasa", "uncontended cycle through Rasa's factory", rates["convlock"], "cycles/s",
                   rates[name], name, target=Target(">=", 3) if name == "rasa redis" else None,
                   note=f"pinned: {'yes' if was_pinned else 'no'}; loop: {loop_name}"))
    add(Figure("rasa", "round-trip ceiling of the ratio to rasa redis (3.5 x async ÷ sync PING)",
               3.5 * rates["async PING"] / rates["sync PING"], ""))

    messages, deadline = (10, 5.0) if ctx.quick else (200, 30.0)
    workers = ctx.workers(2)
    elapsed: dict[str, float] = {}
    for name, path in files.items():
        ctx.progress(f"rasa: contended, {name}")
        counter_key = f"{ctx.prefix}-rasa-counter:{name}"
        ready_key = f"{counter_key}:ready"  # the workers' start barrier
        with redis.Redis.from_url(target.url) as client:
            client.delete(counter_key, ready_key)
        command = {"op": "rasa", "endpoints": str(path), "url": target.url, "counter_key": counter_key,
                   "conversation": "rasa-user", "messages": messages, "hold": 0.0005,
                   "deadline": deadline, "parties": len(workers)}
        answers = run_all(workers, [command, command])
        failed = [a["error"] for a in answers if a["error"]]
        if failed:  # not a figure: the workload itself broke
            raise RuntimeError(f"rasa workload on {name} failed:\n{failed[0]}")
        with redis.Redis.from_url(target.url) as client:
            counter = int(client.get(counter_key) or 0)
            client.delete(counter_key, ready_key)
        completed = sum(len(a["holds"]) for a in answers)
        elapsed[name] = max(a["elapsed"] for a in answers)
        label = f"2 processes x {messages} messages on one conversation"
        add(Figure("rasa", f"{name}: {label}: lost updates", float(completed - counter), "updates",
                   target=Target("==", 0, on="value") if name == "convlock" else None))
        add(Figure("rasa", f"{name}: {label}: LockError (dropped)",
                   float(sum(a["lock_errors"] for a in answers)), "messages",
                   target=Target("==", 0, on="value") if name == "convlock" else None))
        add(Figure("rasa", f"{name}: {label}: unfinished at the deadline",
                   float(sum(a["unfinished"] for a in answers)), "messages",
                   target=Target("==", 0, on="value") if name == "convlock" else None))
    for name in ("rasa redis", "rasa concurrent_redis"):
        add(Figure("rasa", f"contended: time for 2 x {messages} messages", elapsed["convlock"], "s",
                   elapsed[name], f"{name} (stopped at its deadline if stuck)"))
    with redis.Redis.from_url(target.url) as client:
        left = sum(1 for _ in client.scan_iter(match=f"bench{os.getpid()}rasa0:*", count=1000))
    add(Figure("rasa", "convlock keys left in Redis", float(left), "keys",
               target=Target("==", 0, on="value")))
