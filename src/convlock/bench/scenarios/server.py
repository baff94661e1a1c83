"""Scenario 7: ``convlock run`` end to end, against a bare Starlette echo on the same uvicorn.

Set-ups, all started here with the demo handler and no token (loopback):
the bare echo (:mod:`convlock.bench.echo`), one replica with in-memory
stores, one replica with Redis lock and tracker stores, and two such
replicas sharing the Redis (each message to a random one). One client
(:mod:`convlock.bench.http`) drives them all.

* Throughput: 16 conversations at once, each sending its messages one after
  another (a chat user waits for the answer), 20 messages each, four in
  turn per client and block;
  set-ups alternate in blocks and medians are compared. Ratios against the
  echo: target at least 0.5 in memory and 0.35 on Redis.
* Long-conversation growth: one conversation, messages one at a time;
  median latency of the last 200 of 3,000 messages over the first 200 of a
  fresh conversation on the same server (``--quick``: the last 20 of 300
  over the first 20); target at most 1.3, in memory and on Redis. The two
  are measured in alternating blocks of 20 messages once the long one has
  reached message 2,800, so that both see the same machine: on two shared
  cores a single client's latency flips between modes (as the round-trip
  floor does, see ``../shared`` notes on measuring), and measured minutes
  apart the ratio moved between 1.05 and 1.42 in consecutive runs.
* Redis commands per uncontended message, from MONITOR (leaving out what
  Lua scripts call): target at most 2 with lock and tracker on one Redis.
* The lock's share of the server's time, from its ``Server-Timing`` header.

Placement: the servers under test (the echo and every replica) are pinned
to CPU 1, and everything else, this process (the load generator) and the
redis-server this run started, to CPU 0, as if each server had a host of
its own and its clients and its Redis lived elsewhere. Unpinned, three busy
processes on two cores land where the scheduler puts them, and the block
rates were bimodal: the echo's 15,000-16,000 or 19,000-20,000 msgs/s, the
Redis replica's 6,000 or 7,300 (sharing a core with redis-server, or not),
so that the Redis ratio of unchanged code moved between 0.34 and 0.40 from
run to run; pinned, three runs gave 0.38-0.41 (and the echo 19,500-20,000).
The 2-replica set-up's replicas then share CPU 1: it shows what a second
replica costs, not what it adds. Where pinning is impossible (one CPU, or
not allowed) nothing is pinned and the figures' notes say so.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

from ..http import Connection
from ..measure import median, percentile, pin, unpin
from ..procs import RedisTarget, Replica, start_echo, start_replica
from ..report import Figure, Target
from . import Context
from .lock_redis import CommandMonitor

__all__ = ["run"]

WEBHOOK = "/webhooks/rest/webhook"
CONCURRENCY = 16


@dataclass
class Setup:
    """A named set of replicas and what its blocks measured."""

    name: str
    urls: list[str]
    rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    #: Server-Timing headers as received: read after the blocks (see _send).
    timings: list[str] = field(default_factory=list)

    def lock_share(self) -> float | None:
        """The lock's share (acquire + release) of the server time its Server-Timing headers report."""
        lock = total = 0.0
        for header in self.timings:
            parts = _timing(header)
            if "total" in parts:
                lock += parts.get("lock", 0.0) + parts.get("release", 0.0)
                total += parts["total"]
        return lock / total if total else None


def _timing(header: str) -> dict[str, float]:
    parts = {}
    for item in header.split(","):
        name, _, duration = item.strip().partition(";dur=")
        if duration:
            parts[name] = float(duration) / 1000
    return parts


def _place(servers: list[Replica], target: RedisTarget) -> bool:
    """Pin ``servers`` to CPU 1, this process and ``target``'s redis-server (if ours) to CPU 0.

    Returns whether every one could be pinned (see "Placement" in the module docstring).
    """
    others = [0] if target.pid is None else [0, target.pid]
    done = [pin(server.popen.pid, 1) for server in servers] + [pin(pid, 0) for pid in others]
    return all(done)


def _unplace(servers: list[Replica], target: RedisTarget) -> None:
    """Undo :func:`_place`: this process and redis-server may run anywhere again (later scenarios)."""
    for pid in [0, target.pid, *(server.popen.pid for server in servers)]:
        if pid is not None:
            unpin(pid)


async def _send(connection: Connection, sender: str, text: str, setup: Setup | None) -> float:
    body = json.dumps({"sender": sender, "message": text}).encode()
    start = time.perf_counter()
    status, headers, payload = await connection.post(WEBHOOK, body)
    elapsed = time.perf_counter() - start
    if status != 200:
        raise RuntimeError(f"{status} {payload.decode(errors='replace')[:300]}")
    if setup is not None and "server-timing" in headers:
        # Kept as text: parsing it here would spend the load generator's
        # CPU, on the cores the server shares, on convlock's set-ups only
        # (the echo sends no such header).
        setup.timings.append(headers["server-timing"])
    return elapsed


async def _block(
    setup: Setup, block: int, per_conversation: int, record: bool, conversations: int = 1
) -> None:
    """``CONCURRENCY`` clients at once, each sending ``conversations`` new conversations in turn."""
    rng = random.Random(block)

    async def client(n: int) -> None:
        connections = [Connection(url) for url in setup.urls]
        try:
            for c in range(conversations):
                sender = f"{setup.name[:1]}-{block}-{n}-{c}-{time.monotonic_ns()}"
                for i in range(per_conversation):
                    latency = await _send(rng.choice(connections), sender, f"m{i}", setup if record else None)
                    if record:
                        setup.latencies.append(latency)
        finally:
            for connection in connections:
                await connection.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(CONCURRENCY)))
    if record:
        setup.rates.append(CONCURRENCY * conversations * per_conversation / (time.perf_counter() - start))


async def _throughput(setups: list[Setup], blocks: int, per_conversation: int, conversations: int) -> None:
    for setup in setups:  # warm-up: connections, scripts, imports
        await _block(setup, -1, 2, record=False)
    for block in range(blocks):
        for setup in setups:
            await _block(setup, block, per_conversation, record=True, conversations=conversations)


async def _growth(url: str, messages: int, edge: int, block: int = 20) -> tuple[list[float], list[float]]:
    """Latencies of a long conversation's ``messages`` messages, and of a fresh one's first ``edge``.

    The long conversation's last ``edge`` messages alternate, ``block`` at a
    time, with the fresh conversation's first ``edge``.
    """
    long, fresh = Connection(url), Connection(url)
    long_sender, fresh_sender = f"long-{time.monotonic_ns()}", f"fresh-{time.monotonic_ns()}"
    try:
        grown = [await _send(long, long_sender, f"m{i}", None) for i in range(messages - edge)]
        first: list[float] = []
        for start in range(0, edge, block):
            stop = min(start + block, edge)
            first += [await _send(fresh, fresh_sender, f"m{i}", None) for i in range(start, stop)]
            late = range(messages - edge + start, messages - edge + stop)
            grown += [await _send(long, long_sender, f"m{i}", None) for i in late]
        return grown, first
    finally:
        await long.close()
        await fresh.close()


async def _sequential(url: str, sender: str, messages: int) -> None:
    connection = Connection(url)
    try:
        for i in range(messages):
            await _send(connection, sender, f"m{i}", None)
    finally:
        await connection.close()


def run(ctx: Context) -> None:
    """Scenario 7 (see the module docstring)."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        ctx.results.skip("server", "every comparison", f"the server extra is not installed ({exc.name})")
        return
    target = ctx.redis()
    work = ctx.work / "server"
    work.mkdir(parents=True, exist_ok=True)
    # Its own key prefix: with --endpoints this may be someone's Redis.
    block = {**target.endpoints_block(), "key_prefix": f"{ctx.prefix}-server"}
    endpoints: dict[str, Any] = {"lock_store": dict(block), "tracker_store": dict(block)}
    replicas: list[Replica] = []
    was_pinned = False
    try:
        echo = start_echo(work)
        replicas.append(echo)
        memory = start_replica(work)
        replicas.append(memory)
        redis_replicas = [start_replica(work, endpoints) for _ in range(3)]
        replicas.extend(redis_replicas)
        for replica in replicas:
            replica.wait_ready()
        was_pinned = _place(replicas, target)
        ctx.progress(f"server: replicas ready (pinned: {'yes' if was_pinned else 'no'})")
        setups = [
            Setup("echo", [echo.url]),
            Setup("memory, 1 replica", [memory.url]),
            Setup("redis, 1 replica", [redis_replicas[0].url]),
            Setup("redis, 2 replicas", [redis_replicas[1].url, redis_replicas[2].url]),
        ]
        # Blocks of one 20-message conversation per client lasted 30-40 ms for
        # the echo, and on two shared cores the scheduler's placement of the
        # processes flips at about that scale: within one run the echo's
        # blocks ranged from 7.5k to 15k msgs/s, and the Redis ratio of
        # unchanged code from 0.29 to 0.41 between runs. Four conversations
        # per client and block (the same 20-message conversations) average
        # over several flips.
        blocks, per_conversation, conversations = (2, 5, 1) if ctx.quick else (11, 20, 4)
        asyncio.run(_throughput(setups, blocks, per_conversation, conversations))
        ctx.progress("server: throughput done; long conversations")
        long_n, edge = (300, 20) if ctx.quick else (3000, 200)
        growth: dict[str, list[float]] = {}
        fresh: dict[str, list[float]] = {}
        for name, url in (("memory", memory.url), ("redis", redis_replicas[0].url)):
            growth[name], fresh[name] = asyncio.run(_growth(url, long_n, edge))
        ctx.progress("server: commands per message (MONITOR)")
        sender = f"monitored-{time.monotonic_ns()}"
        monitored = 10 if ctx.quick else 50
        asyncio.run(_sequential(redis_replicas[0].url, sender, 1))
        with CommandMonitor(target) as monitor:
            asyncio.run(_sequential(redis_replicas[0].url, sender, monitored))
            time.sleep(0.05)
    finally:
        _unplace(replicas, target)
        for replica in replicas:
            replica.stop()

    add = ctx.results.add
    echo_rate = median(setups[0].rates)
    targets = {"memory, 1 replica": 0.5, "redis, 1 replica": 0.35}
    for setup in setups[1:]:
        rate = median(setup.rates)
        threshold = targets.get(setup.name)
        add(Figure("server", f"{setup.name}: messages/s ({CONCURRENCY} conversations at once)", rate,
                   "msgs/s", echo_rate, "bare Starlette echo",
                   target=Target(">=", threshold) if threshold else None,
                   note=f"servers pinned to their own CPU: {'yes' if was_pinned else 'no'}"))
    for setup in setups:
        add(Figure("server", f"{setup.name}: latency p50", percentile(setup.latencies, 0.5) * 1000, "ms",
                   percentile(setups[0].latencies, 0.5) * 1000, "bare Starlette echo"))
        add(Figure("server", f"{setup.name}: latency p99", percentile(setup.latencies, 0.99) * 1000, "ms",
                   percentile(setups[0].latencies, 0.99) * 1000, "bare Starlette echo"))
    for setup in setups[1:]:
        share = setup.lock_share()
        if share is not None:
            add(Figure("server", f"{setup.name}: lock acquire+release share of server time", share, ""))
    first = f"1-{edge}"
    last = f"{long_n - edge + 1}-{long_n}"
    for name, latencies in growth.items():
        add(Figure("server", f"{name}: long conversation, median latency of messages {last}",
                   median(latencies[-edge:]) * 1000, "ms", median(fresh[name]) * 1000,
                   f"messages {first} of a fresh conversation, in alternating blocks",
                   target=Target("<=", 1.3)))
    add(Figure("server", "Redis commands per uncontended message (MONITOR, not lua)",
               len(monitor.commands) / monitored, "commands", target=Target("<=", 2, on="value"),
               note=f"lock and tracker on one Redis; {len(monitor.handshakes)} connection handshakes in "
               f"{monitored} messages not counted"))
    ctx.results.series["server_monitor_commands"] = sorted(set(monitor.commands))
    ctx.results.series["server_rates"] = {s.name: s.rates for s in setups}
    step = max(1, long_n // 150)
    ctx.results.series["server_growth_ms"] = {
        name: [[i + 1, median(values[i : i + step]) * 1000] for i in range(0, len(values), step)]
        for name, values in growth.items()
    }
