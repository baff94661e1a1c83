"""End-to-end ``convlock run``: messages/s and latency through 1 and 2 replicas, and the lock's share.

Starts its own redis-server on a free loopback port (never 6379) with
``tests/redis_procs.py`` and three set-ups side by side, all with the demo
handler:

* ``1 replica, redis``: one ``convlock run`` with Redis lock and tracker stores;
* ``2 replicas, redis``: two such processes sharing the Redis, each message
  sent to a random one of them;
* ``1 replica, memory``: one process with in-memory stores (the floor: no
  Redis at all).

Load: ``--concurrency`` conversations at once, each a client sending its
messages one after another (a chat user waits for the answer); new
conversations every block, so the stored history stays short. Following
``shared/notes/measuring.md``, the set-ups alternate in short blocks and the
medians of the blocks are compared.

Printed per set-up: messages/s, client-side p50/p99 latency, and the lock's
share of the server's request time, from the ``Server-Timing`` header the
server sends (``lock`` = waiting for and acquiring the lock, ``release``;
both measured inside the server, so the share is independent of the HTTP
client). Also the ratio of 2-replica to 1-replica throughput.

On a 2-core machine the load generator, the replicas and redis-server share
the cores, so a second replica adds parallelism only where a core is idle:
read the 2-replica ratio with that in mind.

Run: .venv/bin/python bench/server.py [--blocks N] [--concurrency C] [--messages M]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "server")]

from server_procs import ServerProcess, start_server, write_endpoints  # noqa: E402

import redis_procs  # noqa: E402  (lives in tests/, found through the path above)

WEBHOOK = "/webhooks/rest/webhook"


@dataclass
class Sample:
    """What one block of one set-up measured."""

    seconds: float = 0.0
    messages: int = 0
    latencies: list[float] = field(default_factory=list)
    lock: float = 0.0
    total: float = 0.0
    lock_each: list[float] = field(default_factory=list)
    total_each: list[float] = field(default_factory=list)


@dataclass
class Setup:
    """A named set of replicas and what its blocks measured."""

    name: str
    urls: list[str]
    samples: list[Sample] = field(default_factory=list)


class Connection:
    """A minimal HTTP/1.1 keep-alive client for one server.

    httpx costs more CPU per request than the server does, and on two cores
    the load generator would then measure itself; this sends a fixed request
    shape and reads ``Content-Length`` bodies, nothing more.
    """

    def __init__(self, url: str) -> None:
        self.host, _, port = url.removeprefix("http://").partition(":")
        self.port = int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send one POST with a JSON body; return status, headers (lower-case names) and body."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        payload = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, payload

    async def close(self) -> None:
        """Close the connection if it was opened."""
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


def _timing(header: str) -> dict[str, float]:
    parts = {}
    for item in header.split(","):
        name, _, duration = item.strip().partition(";dur=")
        parts[name] = float(duration) / 1000
    return parts


async def run_block(setup: Setup, block: int, concurrency: int, per_conv: int) -> Sample:
    """``concurrency`` sequential clients, ``per_conv`` messages each, to random replicas."""
    sample = Sample()
    rng = random.Random(block)

    async def client(n: int) -> None:
        sender = f"{setup.name[:1]}-{block}-{n}-{time.monotonic_ns()}"
        connections = [Connection(url) for url in setup.urls]
        try:
            for i in range(per_conv):
                await one(
                    rng.choice(connections), json.dumps({"sender": sender, "message": f"m{i}"}).encode()
                )
        finally:
            for connection in connections:
                await connection.close()

    async def one(connection: Connection, body: bytes) -> None:
        start = time.perf_counter()
        status, headers, payload = await connection.post(WEBHOOK, body)
        sample.latencies.append(time.perf_counter() - start)
        if status != 200:
            raise RuntimeError(f"{setup.name}: {status} {payload.decode(errors='replace')}")
        parts = _timing(headers["server-timing"])
        lock = parts["lock"] + parts["release"]
        sample.lock += lock
        sample.total += parts["total"]
        sample.lock_each.append(lock)
        sample.total_each.append(parts["total"])

    start = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(concurrency)))
    sample.seconds = time.perf_counter() - start
    sample.messages = concurrency * per_conv
    return sample


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(setups: list[Setup]) -> None:
    """Print one line per set-up and the replica ratio."""
    print(
        f"{'set-up':<20} {'msgs/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'server p50':>10} {'lock p50':>9} "
        f"{'lock/server':>11} {'lock/latency':>12}"
    )
    rates: dict[str, float] = {}
    for setup in setups:
        rate = statistics.median(s.messages / s.seconds for s in setup.samples)
        latencies = [x for s in setup.samples for x in s.latencies]
        share = statistics.median(s.lock / s.total for s in setup.samples)
        of_latency = statistics.median(s.lock / sum(s.latencies) for s in setup.samples)
        lock_each = [x for s in setup.samples for x in s.lock_each]
        total_each = [x for s in setup.samples for x in s.total_each]
        rates[setup.name] = rate
        print(
            f"{setup.name:<20} {rate:>7.0f} {_percentile(latencies, 0.5) * 1000:>7.2f} "
            f"{_percentile(latencies, 0.99) * 1000:>7.2f} {_percentile(total_each, 0.5) * 1000:>10.3f} "
            f"{_percentile(lock_each, 0.5) * 1000:>9.3f} {share:>11.1%} {of_latency:>12.1%}"
        )
    print("(ms; server = time inside the server from drawing the ticket to releasing the lock;")
    print(" lock = acquire + release; shares are sums over a block, medians over blocks)")
    one, two = rates["1 replica, redis"], rates["2 replicas, redis"]
    print(f"2 replicas / 1 replica throughput: {two / one:.2f}")
    print(f"redis / memory throughput (1 replica): {one / rates['1 replica, memory']:.2f}")


async def measure(setups: list[Setup], blocks: int, concurrency: int, per_conv: int) -> None:
    """Warm up, then alternate blocks between the set-ups."""
    for setup in setups:  # warm-up: connections, scripts, imports
        await run_block(setup, -1, concurrency, 2)
    for block in range(blocks):
        for setup in setups:
            setup.samples.append(await run_block(setup, block, concurrency, per_conv))


def main() -> int:
    """Start Redis and the replicas, measure, print, stop everything."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--blocks", type=int, default=11)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--messages", type=int, default=20, help="messages per conversation per block")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="convlock-bench-") as tmp:
        work = Path(tmp)
        redis = redis_procs.start_redis(work / "redis")
        servers: list[ServerProcess] = []
        try:
            connection = {"url": redis.host, "port": redis.port, "db": 0}
            config = write_endpoints(
                work / "redis.yml",
                {
                    "lock_store": {"type": "redis", **connection},
                    "tracker_store": {"type": "redis", **connection},
                },
            )
            servers = [start_server(work, endpoints=config, wait=False) for _ in range(3)]
            servers.append(start_server(work, wait=False))
            for server in servers:
                server.wait_ready()
            setups = [
                Setup("1 replica, redis", [servers[0].url]),
                Setup("2 replicas, redis", [servers[1].url, servers[2].url]),
                Setup("1 replica, memory", [servers[3].url]),
            ]
            print(
                f"{args.blocks} blocks x {args.concurrency} conversations x {args.messages} messages "
                "per set-up; medians of blocks",
                flush=True,
            )
            asyncio.run(measure(setups, args.blocks, args.concurrency, args.messages))
            report(setups)
        finally:
            for server in servers:
                server.stop()
            redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
