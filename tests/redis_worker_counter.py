"""Worker process for the multi-process test: lock, non-atomic increment, record the hold.

Run as ``python redis_worker_counter.py CONFIG_JSON``; prints ``ready``, waits
for a line on stdin (so all workers start together), then prints one JSON
line: ``{"holds": [[conversation, ticket, start, end, pid], ...]}`` with times
from ``time.monotonic()``, which is one clock for every process on the host.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import redis.asyncio as aioredis

from convlock.redis import RedisLockStore


async def run(config: dict[str, Any]) -> list[list[Any]]:
    store = RedisLockStore(config["url"], key_prefix=config["prefix"], lifetime=5, socket_timeout=5)
    counters = aioredis.Redis.from_url(config["url"])
    holds: list[list[Any]] = []

    async def cycles(conversation_id: str) -> None:
        key = f"{config['counter_prefix']}:{conversation_id}"
        for _ in range(config["cycles"]):
            async with store.lock(conversation_id) as held:
                start = time.monotonic()
                # Deliberately not atomic: a second holder would lose updates.
                value = int(await counters.get(key) or 0)
                await asyncio.sleep(config["sleep"])
                await counters.set(key, value + 1)
                holds.append([conversation_id, held.ticket, start, time.monotonic(), os.getpid()])

    try:
        await asyncio.gather(*(cycles(c) for c in config["conversations"]))
    finally:
        await store.aclose()
        await counters.aclose()
    return holds


def main() -> None:
    config = json.loads(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()
    holds = asyncio.run(run(config))
    print(json.dumps({"holds": holds}), flush=True)


if __name__ == "__main__":
    main()
