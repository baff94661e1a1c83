"""``convlock locks ls`` with many idle conversations in Redis, against the same listing with none.

Prints, from one run:

* ``listing``: the time to list 3 locked conversations (the CLI's own
  listing routine: SCAN pages, then one INSPECT per lock) on a Redis that
  also holds ``--idle`` idle conversations (stored state, no lock), next to
  the same listing on a Redis with no other keys, and their ratio. The
  SCAN walks the whole keyspace, so the ratio grows with the keyspace; the
  point is that it stays a small multiple of the empty case, and that
  Redis is never blocked for long;
* ``longest block``: the mean time one SCAN page took inside Redis
  (``INFO commandstats``), next to one ``KEYS`` over the same keyspace,
  which is how long a KEYS-based listing (the spec framework's style)
  would stop every other client.

Both servers are started here on free loopback ports (never 6379), with
``tests/redis_procs.py``; listings on the two alternate in short blocks and
medians are compared (shared/notes/measuring.md).

Run: .venv/bin/python bench/locks_ls.py [--idle N] [--blocks N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import redis_procs  # noqa: E402  (lives in tests/, found through the path above)
from convlock.cli_locks import _ls  # noqa: E402
from convlock.redis import RedisLockStore  # noqa: E402

LOCKED = 3
LISTINGS_PER_BLOCK = 3


async def hold(store: RedisLockStore, names: list[str], ready: asyncio.Event, done: asyncio.Event) -> None:
    """Hold one lock per name until ``done``."""
    async with contextlib.AsyncExitStack() as stack:
        for name in names:
            await stack.enter_async_context(store.lock(name))
        ready.set()
        await done.wait()


async def measure(idle: int, blocks: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        empty = redis_procs.start_redis(Path(folder) / "empty")
        full = redis_procs.start_redis(Path(folder) / "full")
        try:
            full.command(
                "EVAL",
                "for i = 1, tonumber(ARGV[1]) do "
                "redis.call('HSET', 'convlock:tracker:{idle' .. i .. '}', 'n', '0') end",
                0,
                idle,
            )
            stores = {name: RedisLockStore(proc.url(), socket_timeout=10) for name, proc in
                      (("empty", empty), ("full", full))}
            done = asyncio.Event()
            holders = []
            for store in stores.values():
                ready = asyncio.Event()
                names = [f"busy{i}" for i in range(LOCKED)]
                holders.append(asyncio.create_task(hold(store, names, ready, done)))
                await ready.wait()
            full.command("CONFIG", "RESETSTAT")
            times: dict[str, list[float]] = {"empty": [], "full": []}
            for _ in range(blocks):
                for name, store in stores.items():
                    start = time.perf_counter()
                    for _ in range(LISTINGS_PER_BLOCK):
                        rows, _truncated = await _ls(store, 100)
                        assert len(rows) == LOCKED, rows
                    times[name].append((time.perf_counter() - start) / LISTINGS_PER_BLOCK)
            scan = full.command("INFO", "commandstats")["cmdstat_scan"]
            start = time.perf_counter()
            full.command("KEYS", "convlock:{*}:s")
            keys_ms = (time.perf_counter() - start) * 1000
            done.set()
            await asyncio.gather(*holders)
            for store in stores.values():
                await store.aclose()
        finally:
            empty.stop()
            full.stop()
    e, f = statistics.median(times["empty"]), statistics.median(times["full"])
    print(f"listing      {idle:,} idle keys {f * 1000:8.2f} ms   no idle keys {e * 1000:8.2f} ms   "
          f"ratio {f / e:.1f}")
    pages = scan["calls"] // (blocks * LISTINGS_PER_BLOCK)
    print(f"longest block  one SCAN page {scan['usec_per_call'] / 1000:6.2f} ms   "
          f"one KEYS {keys_ms:8.2f} ms   ({pages} pages per listing)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=100_000, help="idle conversations (default 100000)")
    parser.add_argument("--blocks", type=int, default=5, help="alternating blocks (default 5)")
    args = parser.parse_args()
    asyncio.run(measure(args.idle, args.blocks))


if __name__ == "__main__":
    main()
