"""RedisLockStore on a loopback redis-server: cycle rate against the round-trip floor, and hand-off latency.

Prints, from one run:

* ``uncontended``: acquire + release cycles per second on an idle
  conversation, next to the *floor* (two ``PING`` round trips on the same
  client connection, in this process and run) and their ratio (target: at
  least 0.8; an uncontended cycle is two ``EVALSHA`` round trips, so 1.0 is
  the ceiling);
* ``hand-off``: how long after one process starts releasing the lock the
  other process, waiting for a wake-up from Redis, holds it: p50 and p99
  (target: p99 at most 1 ms);
* ``burst``: the time to serve N waiters of one process on one conversation
  (all drawn at once, each handed over in-process by the release before
  it), as a ratio to N uncontended cycles in the same run (target: at most
  1.5), and the peak number of connections the process opened to Redis
  meanwhile, with 2 more waiters on each of 100 other conversations
  (``INFO clients``; target: at most 64).

The bench starts its own redis-server on a free loopback port (never 6379)
with ``tests/redis_procs.py``. Following ``shared/notes/measuring.md``, it
pins redis-server and the clients to different CPUs and interleaves short
blocks of the lock cycle and of the floor, comparing medians.

Run: .venv/bin/python bench/redis_lock.py [--blocks N] [--handoffs N]
Exit status 1 means a target was missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import redis_procs  # noqa: E402  (lives in tests/, found through the path above)
from convlock.redis import RedisLockStore  # noqa: E402

CYCLES_PER_BLOCK = 50
HOLD_SECONDS = 0.001
RATIO_TARGET = 0.8
P99_TARGET_MS = 1.0
BURST_RATIO_TARGET = 1.5
CONNECTIONS_TARGET = 64
CONVERSATION = "bench"


def pin(pid: int, cpu: int) -> bool:
    """Pin ``pid`` (0: this process) to ``cpu`` if the machine has it; True if done."""
    if not hasattr(os, "sched_setaffinity") or cpu not in os.sched_getaffinity(0) | {0, 1}:
        return False
    try:
        os.sched_setaffinity(pid, {cpu})
    except OSError:
        return False
    return True


async def uncontended(url: str, blocks: int) -> tuple[float, float]:
    """Median cycles/s of the lock and of the two-PING floor, in alternating blocks."""
    store = RedisLockStore(url, key_prefix="bench", lifetime=30)
    client = store.client
    lock_rates: list[float] = []
    floor_rates: list[float] = []
    try:
        for _ in range(20):  # warm up: connection, scripts, code paths
            async with store.lock(CONVERSATION):
                pass
            await client.execute_command("PING")
        for _ in range(blocks):
            start = time.perf_counter()
            for _ in range(CYCLES_PER_BLOCK):
                async with store.lock(CONVERSATION):
                    pass
            lock_rates.append(CYCLES_PER_BLOCK / (time.perf_counter() - start))
            start = time.perf_counter()
            for _ in range(CYCLES_PER_BLOCK):
                await client.execute_command("PING")
                await client.execute_command("PING")
            floor_rates.append(CYCLES_PER_BLOCK / (time.perf_counter() - start))
    finally:
        await store.aclose()
    return statistics.median(lock_rates), statistics.median(floor_rates)


async def ping_pong(url: str, rounds: int, ready: Path | None) -> list[tuple[int, float, float]]:
    """Take the lock ``rounds`` times, competing with the other process.

    Returns ``(ticket, granted_at, release_started_at)`` per hold, on the
    host-wide monotonic clock. Each hold lasts long enough for the other
    process to be queued again, so every release is a hand-off.
    """
    store = RedisLockStore(url, key_prefix="bench", lifetime=30)
    records: list[tuple[int, float, float]] = []
    try:
        await store.ping()
        if ready is not None:
            await asyncio.to_thread(ready.touch)
        for _ in range(rounds):
            hold = store.lock(CONVERSATION)
            await hold.__aenter__()
            granted = time.monotonic()
            await asyncio.sleep(HOLD_SECONDS)
            releasing = time.monotonic()
            await hold.__aexit__(None, None, None)
            records.append((hold.ticket, granted, releasing))
    finally:
        await store.aclose()
    return records


def handoffs(url: str, rounds: int, cpu: int | None) -> list[float]:
    """Hand-off latencies (seconds) between this process and a child, both contending."""
    with tempfile.TemporaryDirectory() as folder:
        ready = Path(folder) / "ready"
        child = subprocess.Popen(
            [sys.executable, __file__, "--child", url, str(rounds), str(ready), str(cpu or -1)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            while not ready.exists():
                if child.poll() is not None:
                    raise RuntimeError("the child process died before it was ready")
                time.sleep(0.01)
            mine = asyncio.run(ping_pong(url, rounds, None))
            out, _ = child.communicate(timeout=120)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    theirs = [tuple(record) for record in json.loads(out)]
    holds = sorted([*mine, *theirs])  # by ticket: the order the lock was granted in
    latencies = [later[1] - earlier[2] for earlier, later in itertools.pairwise(holds)]
    # The first few rounds include start-up skew between the two processes.
    return latencies[10:]


async def burst(url: str, waiters: int, repeats: int) -> tuple[float, float]:
    """Median time to serve ``waiters`` concurrent waiters on one conversation, and to run as many cycles.

    Blocks alternate (a burst, then the same number of uncontended cycles),
    and the medians of each are returned, in seconds.
    """
    store = RedisLockStore(url, key_prefix="bench", lifetime=30)
    bursts: list[float] = []
    cycles: list[float] = []

    async def one() -> None:
        async with store.lock(CONVERSATION):
            pass

    try:
        for _ in range(20):
            await one()
        for _ in range(repeats):
            start = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(waiters)))
            bursts.append(time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(waiters):
                await one()
            cycles.append(time.perf_counter() - start)
    finally:
        await store.aclose()
    return statistics.median(bursts), statistics.median(cycles)


async def peak_connections(url: str, server: redis_procs.RedisProcess, waiters: int) -> int:
    """Connections the server saw at most while one process ran a burst on one conversation and 100 others."""
    store = RedisLockStore(url, key_prefix="bench", lifetime=30)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        with server.client() as client:
            while not stop.is_set():
                peak = max(peak, int(client.info("clients")["connected_clients"]) - 1)
                time.sleep(0.002)

    async def one(conversation_id: str) -> None:
        async with store.lock(conversation_id):
            await asyncio.sleep(0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        calls = [one(CONVERSATION) for _ in range(waiters)]
        calls += [one(f"other:{i}") for i in range(100) for _ in range(2)]
        await asyncio.gather(*calls)
    finally:
        stop.set()
        sampler.join(5)
        await store.aclose()
    return peak


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, default=60, help="alternating blocks of 50 cycles (default 60)")
    parser.add_argument("--handoffs", type=int, default=1000, help="holds per process in the hand-off test")
    parser.add_argument("--waiters", type=int, default=1000, help="waiters in the burst test (default 1000)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        url, rounds, ready, cpu = args.child
        if int(cpu) >= 0:
            pin(0, int(cpu))
        records = asyncio.run(ping_pong(url, int(rounds), Path(ready)))
        print(json.dumps(records))
        return 0

    with tempfile.TemporaryDirectory() as folder:
        server = redis_procs.start_redis(Path(folder))
        try:
            pinned = pin(server.pid, 0) and pin(0, 1)
            url = f"redis://{server.host}:{server.port}/0"
            lock_rate, floor_rate = asyncio.run(uncontended(url, args.blocks))
            latencies = handoffs(url, args.handoffs, 1 if pinned else None)
            burst_seconds, cycles_seconds = asyncio.run(burst(url, args.waiters, max(3, args.blocks // 10)))
            peak = asyncio.run(peak_connections(url, server, args.waiters))
            with server.client() as check:
                # A ticket counter outlives its conversation by a millisecond
                # or two, a doorbell by 250 ms; anything later is a leak.
                give_up = time.monotonic() + 2
                while (leftover := check.dbsize()) and time.monotonic() < give_up:
                    time.sleep(0.05)
            version = ".".join(str(part) for part in server.version())
        finally:
            server.stop()

    ratio = lock_rate / floor_rate
    p50 = percentile(latencies, 0.50) * 1000
    p99 = percentile(latencies, 0.99) * 1000
    print(f"redis-server {version} on 127.0.0.1 (loopback); CPUs pinned: {'yes' if pinned else 'no'}")
    print("-" * 96)
    print(
        f"uncontended  lock {lock_rate:8.0f} cycles/s   floor (2 PINGs) {floor_rate:8.0f} cycles/s   "
        f"ratio {ratio:.2f} (target >= {RATIO_TARGET})"
    )
    print(
        f"hand-off     p50 {p50:.3f} ms   p99 {p99:.3f} ms   over {len(latencies)} hand-offs "
        f"between two processes (target p99 <= {P99_TARGET_MS} ms)"
    )
    burst_ratio = burst_seconds / cycles_seconds
    print(
        f"burst        {args.waiters} local waiters served in {burst_seconds * 1000:.1f} ms, "
        f"{args.waiters} uncontended cycles in {cycles_seconds * 1000:.1f} ms   "
        f"ratio {burst_ratio:.2f} (target <= {BURST_RATIO_TARGET})"
    )
    print(
        f"connections  peak {peak} during {args.waiters} waiters + 2 on each of 100 conversations "
        f"(target <= {CONNECTIONS_TARGET})"
    )
    print(f"keys left in Redis: {leftover}")
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    met = (
        ratio >= RATIO_TARGET
        and p99 <= P99_TARGET_MS
        and burst_ratio <= BURST_RATIO_TARGET
        and peak <= CONNECTIONS_TARGET
        and leftover == 0
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
