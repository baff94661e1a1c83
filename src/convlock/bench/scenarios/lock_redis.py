"""Scenarios 3, 5, 6 and 9: ``RedisLockStore`` against the round-trip floor, raw EVALSHA and other locks.

* 3 ``cycle``: uncontended acquire+release cycles/s next to two ``PING``
  round trips on the store's own connection (the floor: a cycle is two
  scripts, so about 0.9 of it is the ceiling; target 0.8), redis-py's
  asyncio ``Lock`` and ``python-redis-lock``, in interleaved blocks, with
  redis-server and this process pinned to different CPUs when this run
  started the Redis.
* 5 ``throughput``: cycles/s of 1, 2 and 4 processes each cycling 1, 10,
  100 and 1000 conversations (one task per conversation, the same
  conversations in every process), next to the same processes calling
  ``EVALSHA`` of ``return 1`` from as many tasks (half its rate: a cycle is
  two scripts), on the same number of connections.
* 6 ``footprint``: commands a cycle sends (MONITOR, not counting what Lua
  scripts call), and Redis memory per waiting ticket and per idle
  conversation (0 expected: nothing is left once a conversation is idle).
* 10 ``burst`` (issue: one hot conversation must not exhaust a process):
  the time to serve N waiters of one process on one conversation, all
  drawn at once and each handed over in-process by the release before it,
  against N uncontended cycles in alternating blocks (target: at most 1.5),
  and the peak number of connections the process opens meanwhile, with 2
  more waiters on each of 100 other conversations (``INFO clients``;
  target: at most 64, the default ``max_connections`` is 50).
* 9 ``listing`` (was bench/locks_ls.py): ``convlock locks ls``'s listing
  with many idle conversations in Redis against the same listing with none,
  and the longest time one SCAN page blocks Redis against one KEYS.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from ..measure import median, pin, unpin
from ..procs import RedisTarget, run_all, spawn_redis
from ..report import Figure, Target
from . import Context

__all__ = ["CommandMonitor", "burst", "cycle", "footprint", "listing", "throughput"]

CYCLES_PER_BLOCK = 50
CONVERSATION = "bench"


@contextlib.contextmanager
def pinned(target: RedisTarget) -> Iterator[bool]:
    """Pin redis-server to CPU 0 and this process to CPU 1 while inside; True if it could."""
    done = target.pid is not None and pin(target.pid, 0) and pin(0, 1)
    try:
        yield done
    finally:
        unpin(0)
        if target.pid is not None:
            unpin(target.pid)


def _import_python_redis_lock() -> Any:
    try:
        import redis_lock
    except ImportError:
        return None
    return redis_lock


MISSING_PRL = "python-redis-lock is not installed (pip install 'convlock[bench]')"


async def _cycle(ctx: Context, blocks: int) -> dict[str, float]:
    from ...redis import RedisLockStore

    target = ctx.redis()
    store = RedisLockStore(target.url, key_prefix=ctx.prefix, lifetime=30)
    client = store.client
    other = aioredis.Redis.from_url(target.url)
    sync_client = redis.Redis.from_url(target.url)
    redis_lock = _import_python_redis_lock()
    rates: dict[str, list[float]] = {"convlock": [], "floor": [], "redis-py": [], "python-redis-lock": []}

    async def convlock_block() -> None:
        for _ in range(CYCLES_PER_BLOCK):
            async with store.lock(CONVERSATION):
                pass

    async def floor_block() -> None:
        for _ in range(CYCLES_PER_BLOCK):
            await client.execute_command("PING")
            await client.execute_command("PING")

    async def redis_py_block() -> None:
        for _ in range(CYCLES_PER_BLOCK):
            async with other.lock(f"{ctx.prefix}:redis-py", timeout=30):
                pass

    async def prl_block() -> None:
        for _ in range(CYCLES_PER_BLOCK):
            with redis_lock.Lock(sync_client, f"{ctx.prefix}:prl", expire=30):
                pass

    contenders = {"convlock": convlock_block, "floor": floor_block, "redis-py": redis_py_block}
    if redis_lock is not None:
        contenders["python-redis-lock"] = prl_block
    try:
        for run in contenders.values():  # warm up: connections, scripts, code paths
            await run()
        for _ in range(blocks):
            for name, run in contenders.items():
                start = time.perf_counter()
                await run()
                rates[name].append(CYCLES_PER_BLOCK / (time.perf_counter() - start))
    finally:
        await store.aclose()
        await other.aclose()
        sync_client.close()
    return {name: median(values) for name, values in rates.items() if values}


def cycle(ctx: Context) -> None:
    """Scenario 3 (see the module docstring)."""
    with pinned(ctx.redis()) as was_pinned:
        rates = asyncio.run(_cycle(ctx, 6 if ctx.quick else 60))
    ctx.results.series["cpus_pinned"] = was_pinned
    ours = rates["convlock"]
    add = ctx.results.add
    add(Figure("redis-cycle", "uncontended cycle", ours, "cycles/s", rates["floor"], "two PINGs",
               target=Target(">=", 0.8), note=f"pinned: {'yes' if was_pinned else 'no'}"))
    add(Figure("redis-cycle", "uncontended cycle", ours, "cycles/s", rates["redis-py"],
               "redis-py asyncio Lock"))
    if "python-redis-lock" in rates:
        add(Figure("redis-cycle", "uncontended cycle", ours, "cycles/s", rates["python-redis-lock"],
                   "python-redis-lock (sync client)"))
    else:
        ctx.results.skip("redis-cycle", "against python-redis-lock", MISSING_PRL)


def throughput(ctx: Context) -> None:
    """Scenario 5 (see the module docstring)."""
    target = ctx.redis()
    # --quick only has to show that every cell of the grid yields a figure:
    # a short window, and a short lead for the workers to warm up (a late
    # worker just starts late; its rate is its own count over its own time).
    seconds = 0.15 if ctx.quick else 1.0
    repeats = 1 if ctx.quick else 3
    lead, lead_1000 = (0.1, 0.3) if ctx.quick else (0.3, 0.6)
    table: dict[str, list[list[float]]] = {}
    for processes in (1, 2, 4):
        workers = ctx.workers(processes)
        for conversations in (1, 10, 100, 1000):
            ctx.progress(f"throughput: {processes} process(es) x {conversations} conversations")
            counts: dict[str, list[float]] = {"lock": [], "evalsha": []}
            for _ in range(repeats):
                for kind in ("lock", "evalsha"):
                    start_at = time.monotonic() + (lead if conversations < 1000 else lead_1000)
                    command = {"op": "throughput", "kind": kind, "url": target.url, "prefix": ctx.prefix,
                               "conversations": conversations, "seconds": seconds, "start_at": start_at}
                    counts[kind].append(sum(run_all(workers, [command] * processes)))
            ours, calls = median(counts["lock"]), median(counts["evalsha"])
            table.setdefault(str(processes), []).append([conversations, ours, calls])
            ctx.results.add(
                Figure("throughput", f"{processes} proc x {conversations} conv", ours, "cycles/s", calls / 2,
                       "raw EVALSHA calls/s ÷ 2")
            )
    ctx.results.series["throughput"] = table


class CommandMonitor:
    """Count what clients send while inside, from MONITOR, leaving out the commands Lua scripts call."""

    END = "convlock-bench-monitor-end"
    #: What a new connection sends before its first command: counted apart,
    #: since a pooled connection pays it once, not per cycle.
    HANDSHAKE = frozenset({"HELLO", "AUTH", "CLIENT", "SELECT"})

    def __init__(self, target: RedisTarget) -> None:
        self.target = target
        self.commands: list[str] = []
        self.handshakes: list[str] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)

    def _listen(self) -> None:
        with redis.Redis.from_url(self.target.url) as client, client.monitor() as monitor:
            self._ready.set()
            for entry in monitor.listen():
                command = str(entry.get("command", ""))
                if self.END in command:
                    return
                if entry.get("client_type") != "lua":
                    name = command.split(" ", 1)[0].upper()
                    (self.handshakes if name in self.HANDSHAKE else self.commands).append(name)

    def __enter__(self) -> CommandMonitor:
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("MONITOR did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        with redis.Redis.from_url(self.target.url) as client:
            client.echo(self.END)
        self._thread.join(10)


async def _commands_per_cycle(ctx: Context, cycles: int) -> float:
    from ...redis import RedisLockStore

    store = RedisLockStore(ctx.redis().url, key_prefix=ctx.prefix, lifetime=30)
    try:
        for _ in range(5):
            async with store.lock("monitored"):
                pass
        with CommandMonitor(ctx.redis()) as monitor:
            for _ in range(cycles):
                async with store.lock("monitored"):
                    pass
            await asyncio.sleep(0.05)
    finally:
        await store.aclose()
    ctx.results.series["monitor_commands"] = sorted(set(monitor.commands))
    ctx.results.series["monitor_handshakes"] = len(monitor.handshakes)
    return len(monitor.commands) / cycles


def _count_keys(client: redis.Redis, prefix: str) -> int:
    return sum(1 for _ in client.scan_iter(match=f"{prefix}*", count=1000))


async def _memory(ctx: Context, waiters: int, idle: int) -> dict[str, float]:
    """Redis memory per idle conversation and per waiting ticket, and keys the idle ones left."""
    from ...redis import RedisLockStore

    target = ctx.redis()
    prefix = f"{ctx.prefix}-mem"
    store = RedisLockStore(target.url, key_prefix=prefix, lifetime=30)
    found: dict[str, float] = {}
    with redis.Redis.from_url(target.url) as client:
        try:
            async with store.lock("warm"):
                pass
            await asyncio.sleep(0.5)  # doorbells expire after 250 ms
            start = client.info("memory")
            for index in range(idle):
                async with store.lock(f"idle-{index}"):
                    pass
            await asyncio.sleep(0.5)
            end = client.info("memory")
            found["idle_dataset"] = (end["used_memory_dataset"] - start["used_memory_dataset"]) / idle
            found["idle_keys"] = _count_keys(client, prefix)

            holder = store.lock("queue")
            await holder.__aenter__()
            await asyncio.sleep(0.3)
            before = client.info("memory")
            clients_before = int(client.info("clients")["connected_clients"])

            async def wait_once() -> None:
                async with store.lock("queue"):
                    pass

            tasks = [asyncio.ensure_future(wait_once()) for _ in range(waiters)]
            await asyncio.sleep(0.5 if waiters <= 100 else 1.5)
            during = client.info("memory")
            found["connections"] = int(client.info("clients")["connected_clients"]) - clients_before
            await holder.__aexit__(None, None, None)
            await asyncio.gather(*tasks)
        finally:
            await store.aclose()
    found["ticket_dataset"] = (during["used_memory_dataset"] - before["used_memory_dataset"]) / waiters
    found["ticket_used"] = (during["used_memory"] - before["used_memory"]) / waiters
    return found


def footprint(ctx: Context) -> None:
    """Scenario 6 (see the module docstring)."""
    cycles = 20 if ctx.quick else 200
    per_cycle = asyncio.run(_commands_per_cycle(ctx, cycles))
    ctx.results.add(
        Figure("footprint", "commands per uncontended cycle (MONITOR, not lua)", per_cycle, "commands",
               target=Target("<=", 2, on="value"),
               note=f"{ctx.results.series['monitor_handshakes']} connection handshakes in {cycles} cycles "
               "not counted")
    )
    waiters, idle = (100, 200) if ctx.quick else (1000, 2000)
    found = asyncio.run(_memory(ctx, waiters, idle))
    add = ctx.results.add
    add(Figure("footprint", f"Redis data memory per idle conversation ({idle} released)",
               found["idle_dataset"], "bytes", target=Target("<=", 8, on="value"),
               note="0 expected; used_memory_dataset, allocator noise either way"))
    add(Figure("footprint", "keys left by idle conversations", float(found["idle_keys"]), "keys",
               target=Target("==", 0, on="value")))
    add(Figure("footprint", f"Redis data memory per waiting ticket ({waiters} waiting)",
               found["ticket_dataset"], "bytes", note="used_memory_dataset"))
    add(Figure("footprint", f"Redis memory per waiting ticket ({waiters} waiting), connections included",
               found["ticket_used"], "bytes",
               note=f"used_memory; {found['connections']:.0f} connections opened meanwhile"))


async def _hold(store: Any, names: list[str], ready: asyncio.Event, done: asyncio.Event) -> None:
    async with contextlib.AsyncExitStack() as stack:
        for name in names:
            await stack.enter_async_context(store.lock(name))
        ready.set()
        await done.wait()


async def _listings(urls: dict[str, str], blocks: int) -> dict[str, float]:
    from ...cli_locks import _ls
    from ...redis import RedisLockStore

    stores = {name: RedisLockStore(url, socket_timeout=10) for name, url in urls.items()}
    done = asyncio.Event()
    holders = []
    times: dict[str, list[float]] = {name: [] for name in stores}
    try:
        for store in stores.values():
            ready = asyncio.Event()
            holders.append(asyncio.ensure_future(_hold(store, [f"busy{i}" for i in range(3)], ready, done)))
            await ready.wait()
        for _ in range(blocks):
            for name, store in stores.items():
                start = time.perf_counter()
                for _ in range(3):
                    rows, _truncated = await _ls(store, 100)
                    if len(rows) != 3:
                        raise RuntimeError(f"locks ls listed {len(rows)} locks, expected 3")
                times[name].append((time.perf_counter() - start) / 3)
    finally:
        done.set()
        await asyncio.gather(*holders)
        for store in stores.values():
            await store.aclose()
    return {name: median(values) for name, values in times.items()}


def listing(ctx: Context) -> None:
    """Scenario 9 (see the module docstring); it starts its own two redis-servers."""
    idle = 5000 if ctx.quick else 100_000
    blocks = 2 if ctx.quick else 5
    empty, empty_target = spawn_redis(Path(ctx.work) / "listing-empty")
    try:
        full, full_target = spawn_redis(Path(ctx.work) / "listing-full")
        try:
            with redis.Redis.from_url(full_target.url) as client:
                client.eval(
                    "for i = 1, tonumber(ARGV[1]) do "
                    "redis.call('HSET', 'convlock:tracker:{idle' .. i .. '}', 'n', '0') end",
                    0,
                    idle,
                )
                client.config_resetstat()
                times = asyncio.run(_listings({"empty": empty_target.url, "full": full_target.url}, blocks))
                scan = client.info("commandstats")["cmdstat_scan"]
                start = time.perf_counter()
                client.keys("convlock:{*}:s")
                keys_ms = (time.perf_counter() - start) * 1000
        finally:
            full.kill()
    finally:
        empty.kill()
    add = ctx.results.add
    add(Figure("listing", f"locks ls of 3 locks among {idle:,} idle keys", times["full"] * 1000, "ms",
               times["empty"] * 1000, "same listing, no idle keys"))
    add(Figure("listing", "longest Redis block: one SCAN page", scan["usec_per_call"] / 1000, "ms",
               keys_ms, "one KEYS over the same keyspace"))


async def _burst_times(url: str, waiters: int, repeats: int) -> tuple[float, float]:
    """Median seconds to serve ``waiters`` concurrent waiters on one conversation, and as many cycles."""
    from ...redis import RedisLockStore

    store = RedisLockStore(url, key_prefix="bench-burst", lifetime=30)
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
    return median(bursts), median(cycles)


async def _peak_connections(target: RedisTarget, waiters: int) -> int:
    """Connections Redis saw at most (less the sampler's) while one process ran a burst."""
    from ...redis import RedisLockStore

    store = RedisLockStore(target.url, key_prefix="bench-burst", lifetime=30)
    before = _clients(target)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        with redis.Redis.from_url(target.url) as client:
            while not stop.is_set():
                peak = max(peak, int(client.info("clients")["connected_clients"]) - 1 - before)
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


def _clients(target: RedisTarget) -> int:
    with redis.Redis.from_url(target.url) as client:
        return int(client.info("clients")["connected_clients"]) - 1


def burst(ctx: Context) -> None:
    """Scenario 10 (see the module docstring)."""
    target = ctx.redis()
    waiters = 200 if ctx.quick else 1000
    served, cycled = asyncio.run(_burst_times(target.url, waiters, 3 if ctx.quick else 7))
    add = ctx.results.add
    add(Figure("burst", f"serve {waiters} local waiters on one conversation", served * 1000, "ms",
               cycled * 1000, f"{waiters} uncontended cycles", target=Target("<=", 1.5)))
    peak = asyncio.run(_peak_connections(target, waiters))
    add(Figure("burst", f"peak connections: {waiters} waiters + 2 on each of 100 conversations",
               float(peak), "connections", target=Target("<=", 64, on="value"),
               note="max_connections 50 (default)"))
