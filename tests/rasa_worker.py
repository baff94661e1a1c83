"""One replica of the Rasa workload: messages on one conversation, each under Rasa's lock store.

Run as ``python rasa_worker.py CONFIG_JSON``. The store is built the way a
Rasa user configures it: ``read_endpoint_config(endpoints, "lock_store")``
then ``LockStore.create(...)``. Each message does, as Rasa's processor does::

    async with store.lock(sender_id, wait_time_in_seconds=0.01):
        ... a non-atomic read-modify-write of a counter in Redis ...

``tasks`` messages at a time run concurrently (a Rasa server handles many
requests at once); ``messages`` in all. Prints ``ready``, waits for a line
on stdin (so that all replicas start together), then prints one JSON line::

    {"holds": [[ticket, start, end, pid], ...], "lock_errors": N, "unfinished": N,
     "elapsed": seconds, "error": "..." | null}

``ticket`` is convlock's fencing token, or null for Rasa's own stores, whose
``lock()`` yields no ticket number; times come from ``time.monotonic()``,
which is one clock for every process of the host. Past ``deadline`` seconds
the messages still waiting are cancelled and counted as ``unfinished``: Rasa's
stores can stall for a whole lock lifetime.

Used by tests/test_rasa_integration.py (``convlock bench`` has its own copy in
convlock.bench.worker, since the package cannot import from tests/).
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

import redis.asyncio as aioredis
import structlog

# Rasa's lock stores log every step at debug level through structlog, whose
# default configuration prints everything to stdout; a Rasa server configures
# it to its log level, which this mirrors.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

from rasa.core.lock_store import LockError, LockStore  # noqa: E402
from rasa.utils.endpoints import read_endpoint_config  # noqa: E402


async def run(config: dict[str, Any]) -> dict[str, Any]:
    """Run the workload described by ``config``; return the report (see the module docstring)."""
    store = LockStore.create(read_endpoint_config(config["endpoints"], "lock_store"))
    counters = aioredis.Redis.from_url(config["counter_url"])
    key = config["counter_key"]
    holds: list[list[Any]] = []
    lock_errors = 0
    queue = list(range(config["messages"]))

    async def one_message() -> None:
        nonlocal lock_errors
        try:
            async with store.lock(config["conversation"], wait_time_in_seconds=0.01) as lock:
                start = time.monotonic()
                # Deliberately not atomic: two holders at once lose updates.
                value = int(await counters.get(key) or 0)
                await asyncio.sleep(config["hold"])
                await counters.set(key, value + 1)
                holds.append([getattr(lock, "ticket", None), start, time.monotonic(), os.getpid()])
        except LockError:
            lock_errors += 1  # Rasa drops such a message

    async def task() -> None:
        while queue:
            queue.pop()
            await one_message()

    started = time.monotonic()
    error = None
    workers = [asyncio.ensure_future(task()) for _ in range(config["tasks"])]
    try:
        await asyncio.wait_for(asyncio.gather(*workers), config["deadline"])
    except TimeoutError:
        pass  # the unfinished messages are counted below
    except Exception:  # reported, so that the parent shows why
        error = traceback.format_exc(limit=5)
    elapsed = time.monotonic() - started
    finished = len(holds) + lock_errors
    await counters.aclose()
    close = getattr(store, "aclose", None)
    if close is not None:
        await close()
    return {
        "holds": holds,
        "lock_errors": lock_errors,
        "unfinished": config["messages"] - finished,
        "elapsed": elapsed,
        "error": error,
    }


def main() -> None:
    config = json.loads(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()
    report = asyncio.run(run(config))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
