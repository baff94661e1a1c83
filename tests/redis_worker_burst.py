"""Worker process for the two-process burst test.

Run as ``python redis_worker_burst.py CONFIG_JSON``; prints ``ready``, waits
for a line on stdin, then runs ``hot_calls`` concurrent ``lock()`` calls on
the hot conversation and 2 on each of ``others`` conversations. Inside each
hot hold it appends its ticket to a Redis list (the grant order across
processes). Prints one JSON line: failures, grants and the store's statistics.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import redis.asyncio as aioredis

from convlock.redis import RedisLockStore


async def run(config: dict[str, Any]) -> dict[str, Any]:
    store = RedisLockStore(config["url"], key_prefix=config["prefix"], lifetime=30, socket_timeout=10)
    log = aioredis.Redis.from_url(config["url"])
    granted = 0

    async def one(conversation_id: str) -> None:
        nonlocal granted
        async with store.lock(conversation_id) as held:
            granted += 1
            if conversation_id == config["hot"]:
                await log.rpush(config["log"], held.ticket)

    calls = [one(config["hot"]) for _ in range(config["hot_calls"])]
    calls += [one(f"other:{i}") for i in range(config["others"]) for _ in range(2)]
    try:
        results = await asyncio.gather(*calls, return_exceptions=True)
        stats = dict(store.statistics())
    finally:
        await store.aclose()
        await log.aclose()
    failures = [repr(r) for r in results if isinstance(r, BaseException)]
    return {"failures": failures, "granted": granted, "stats": stats}


def main() -> None:
    config = json.loads(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps(asyncio.run(run(config))), flush=True)


if __name__ == "__main__":
    main()
