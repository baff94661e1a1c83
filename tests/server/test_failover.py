"""Sentinel failover under load: no acknowledged message lost, none stored twice, order kept.

One master, one replica and three Sentinels; three ``convlock run``
replicas in Sentinel mode (so the tracker store WAITs for one replica by
default). Clients send numbered messages to random replicas, each with a
``message_id``, the next only after the previous was acknowledged, and
retry anything but a 200 (5xx, 409, a dropped connection) with the same
ID. During the load the master is failed over, by ``SENTINEL FAILOVER`` (the
old master stays up and is demoted about 10 s later) or by ``kill -9`` (it
is started again, empty, and becomes a replica). Afterwards every
conversation must hold every message exactly once, in send order, with the
turn each client was told.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_procs import ServerProcess, all_events, start_server, write_endpoints

import redis_procs
from redis_procs import RedisProcess, SentinelSetup

pytestmark = pytest.mark.slow

WEBHOOK = "/webhooks/rest/webhook"
CONVERSATIONS = 8
#: Acknowledged messages before the failover starts.
WARM_UP = 200
#: Load keeps running this long after the cluster is whole again.
SETTLE = 2.0
#: Bound on the whole run, failover included.
RUN_LIMIT = 75.0


@dataclass
class Tally:
    """What the clients saw."""

    sent: int = 0
    acked: int = 0
    attempts: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    replays: int = 0
    #: conversation -> [(text, turn told)] in send order
    told: dict[str, list[tuple[str, int]]] = field(default_factory=dict)


def sentinel_endpoints(path: Path, setup: SentinelSetup) -> Path:
    connection: dict[str, Any] = {
        "deployment_mode": "sentinel",
        "endpoints": setup.endpoints(),
        "sentinel_service": setup.service,
        "db": 0,
        "socket_timeout": 3,
    }
    return write_endpoints(path / "sentinel.yml", {
        "lock_store": {"type": "redis", "lifetime": 3, **connection},
        "tracker_store": {"type": "redis", **connection},
    })


def master_port(setup: SentinelSetup) -> int | None:
    """The master's port as every Sentinel reports it, or None while they disagree."""
    ports = set()
    for sentinel in setup.sentinels:
        try:
            _, port = sentinel.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", setup.service)
        except Exception:
            return None
        ports.add(int(port))
    return ports.pop() if len(ports) == 1 else None


def replica_of(proc: RedisProcess, port: int) -> bool:
    try:
        info = proc.info("replication")
    except Exception:
        return False
    return info.get("role") == "slave" and info.get("master_port") == str(port) and info.get(
        "master_link_status"
    ) == "up"


async def wait_for(condition: Callable[[], bool], what: str, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, f"no {what} within {limit:g}s"
        await asyncio.sleep(0.1)


async def run_load(
    servers: list[ServerProcess], fail_over: Callable[[], Awaitable[None]], seed: int
) -> Tally:
    """Drive the clients, call ``fail_over`` once warm, stop ``SETTLE`` s after it returns."""
    rng = random.Random(seed)
    tally = Tally()
    stop = asyncio.Event()
    warm = asyncio.Event()
    started = time.monotonic()

    async def client(http: httpx.AsyncClient, sender: str) -> None:
        told = tally.told.setdefault(sender, [])
        i = 0
        while not stop.is_set():
            text = f"{sender}/m{i}"
            body = {"sender": sender, "message": text, "message_id": f"{sender}-{i}"}
            tally.sent += 1
            while True:
                assert time.monotonic() - started < RUN_LIMIT, f"{text} never acknowledged: {tally.statuses}"
                tally.attempts += 1
                try:
                    response = await http.post(f"{rng.choice(servers).url}{WEBHOOK}", json=body)
                except httpx.TransportError as exc:
                    tally.statuses[type(exc).__name__] += 1
                    await asyncio.sleep(0.1)
                    continue
                tally.statuses[str(response.status_code)] += 1
                if response.status_code == 200:
                    break
                assert response.status_code in (409, 503, 504), response.text
                await asyncio.sleep(0.1)
            tally.acked += 1
            if tally.acked >= WARM_UP:
                warm.set()
            tally.replays += response.headers.get("idempotent-replayed") == "true"
            [reply] = response.json()
            turn, _, echoed = reply["text"].partition(": ")
            assert echoed == text
            told.append((text, int(turn.lstrip("#"))))
            i += 1

    async def conductor() -> None:
        await warm.wait()
        await fail_over()
        await asyncio.sleep(SETTLE)
        stop.set()

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as http:
        await asyncio.gather(conductor(), *(client(http, f"fo-{n}") for n in range(CONVERSATIONS)))
    return tally


async def check_stored(servers: list[ServerProcess], tally: Tally) -> dict[str, int]:
    """Assert exactly once, in order, with the turns told; return the loss figures."""
    lost = duplicated = 0
    for sender, told in tally.told.items():
        events = await all_events(f"{servers[0].url}/conversations/{sender}/tracker")
        users = [event for event in events if event["event"] == "user"]
        stored = [event["text"] for event in users]
        counts = Counter(stored)
        lost += sum(1 for text, _ in told if text not in counts)
        duplicated += sum(n - 1 for n in counts.values() if n > 1)
        assert stored == [text for text, _ in told], f"{sender}: stored in send order, each once"
        assert [event["turn"] for event in users] == list(range(1, len(users) + 1))
        assert [turn for _, turn in told] == list(range(1, len(told) + 1)), "each reply told the stored turn"
        assert [event["message_id"] for event in users] == [f"{sender}-{i}" for i in range(len(users))]
    return {"sent": tally.sent, "acked": tally.acked, "lost": lost, "duplicated": duplicated}


def start_replicas(tmp_path: Path, setup: SentinelSetup) -> list[ServerProcess]:
    config = sentinel_endpoints(tmp_path, setup)
    servers = [start_server(tmp_path, endpoints=config, wait=False) for _ in range(3)]
    try:
        for server in servers:
            server.wait_ready()
    except BaseException:
        for server in servers:
            server.kill()
        raise
    return servers


async def test_a_planned_sentinel_failover_loses_no_acknowledged_message(tmp_path: Path) -> None:
    setup = redis_procs.start_sentinel_setup(tmp_path, sentinels=3)
    servers = start_replicas(tmp_path, setup)
    old, [new] = setup.master, setup.replicas
    try:

        async def fail_over() -> None:
            await asyncio.to_thread(setup.fail_over)
            await wait_for(lambda: master_port(setup) == new.port, "switch to the replica", 20)
            await wait_for(lambda: replica_of(old, new.port), "demotion of the old master", 40)

        tally = await run_load(servers, fail_over, seed=1)
        figures = await check_stored(servers, tally)
    finally:
        codes = [server.stop() for server in servers]
        setup.stop()
    print(f"\nplanned failover: {figures}, attempts {tally.attempts}, replays {tally.replays}, {dict(tally.statuses)}")
    assert figures["lost"] == figures["duplicated"] == 0
    assert figures["acked"] == figures["sent"] > WARM_UP
    assert tally.statuses["503"] > 0, "the failover was felt: saves the replica could not confirm were refused"
    assert codes == [0, 0, 0], "\n".join(server.log() for server in servers)
    assert any("+switch-master" in server.log() for server in servers), "the pools heard +switch-master"


async def test_a_crashed_master_loses_no_acknowledged_message(tmp_path: Path) -> None:
    # 2.5 s, not 1 s: on two loaded cores a Sentinel could miss the freshly
    # promoted master's replies for a second and fail over once more, back to
    # the crashed master restarted empty before it had synced, which loses
    # what it never held (Redis's own warning about masters without
    # persistence). Seen in about one run in four with 1 s, before and after
    # the pipelined lock-store connection alike.
    setup = redis_procs.start_sentinel_setup(tmp_path, sentinels=3, down_after_ms=2500)
    servers = start_replicas(tmp_path, setup)
    old, [new] = setup.master, setup.replicas
    try:

        async def fail_over() -> None:
            old.kill()
            await wait_for(lambda: master_port(setup) == new.port, "promotion of the replica", 30)
            await asyncio.to_thread(old.start)  # empty, as after a crash without persistence
            await wait_for(lambda: replica_of(old, new.port), "the old master rejoining as a replica", 40)

        tally = await run_load(servers, fail_over, seed=2)
        figures = await check_stored(servers, tally)
    finally:
        codes = [server.stop() for server in servers]
        setup.stop()
    print(f"\ncrash failover: {figures}, attempts {tally.attempts}, replays {tally.replays}, {dict(tally.statuses)}")
    assert figures["lost"] == figures["duplicated"] == 0
    assert figures["acked"] == figures["sent"] > WARM_UP
    assert codes == [0, 0, 0], "\n".join(server.log() for server in servers)
