"""``convlock run`` on Redis lock and tracker stores: shutdown, fencing after a pause, outages, workers."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_procs import start_server, write_endpoints

from redis_procs import RedisProcess

WEBHOOK = "/webhooks/rest/webhook"
HANDLER = "convlock_test_handlers:control"


def endpoints(path: Path, redis: RedisProcess, *, lifetime: float = 5, tracker: str = "redis") -> Path:
    connection: dict[str, Any] = {"url": redis.host, "port": redis.port, "db": 0, "socket_timeout": 2}
    config: dict[str, Any] = {"lock_store": {"type": "redis", "lifetime": lifetime, **connection}}
    if tracker == "redis":
        config["tracker_store"] = {"type": "redis", **connection}
    return write_endpoints(path / "endpoints.yml", config)


def lock_keys(redis: RedisProcess) -> list[str]:
    """Keys of the lock store (everything but the tracker's)."""
    return [key for key in redis.command("KEYS", "*") if not key.startswith("convlock:tracker:")]


async def assert_lock_keys_drain(redis: RedisProcess, log: str = "") -> None:
    """Wait up to 5 s for the lock store's keys to go (a counter may outlive a release briefly)."""
    for _ in range(100):
        if not lock_keys(redis):
            return
        await asyncio.sleep(0.05)
    assert lock_keys(redis) == [], log


async def wait_until_held(http: httpx.AsyncClient, sender: str, base: str = "") -> dict[str, Any]:
    for _ in range(500):
        serving: dict[str, Any] | None = (await http.get(f"{base}/locks/{sender}")).json()["serving"]
        if serving is not None:
            return serving
        await asyncio.sleep(0.01)
    raise AssertionError(f"{sender} was never locked")


@pytest.mark.slow
async def test_sigterm_finishes_messages_in_flight_and_leaves_no_lock_keys(
    redis_server: RedisProcess, tmp_path: Path
) -> None:
    server = start_server(tmp_path, endpoints=endpoints(tmp_path, redis_server), handler=HANDLER)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            in_flight = asyncio.create_task(http.post(WEBHOOK, json={"sender": "s", "message": "ctl:sleep:1.5"}))
            await wait_until_held(http, "s")
            server.signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            with pytest.raises(httpx.ConnectError):  # no longer accepting new connections
                async with httpx.AsyncClient(base_url=server.url, timeout=5) as other:
                    await other.get("/health")
            response = await in_flight
        assert response.status_code == 200, response.text
        assert response.json()[0]["text"] == "#1: ctl:sleep:1.5"
        assert await asyncio.to_thread(server.popen.wait, 20) == 0
    finally:
        server.kill()
    # The lock store may keep a conversation's ticket counter until the
    # Redis clock passes it (for fencing); it must be gone soon after.
    await assert_lock_keys_drain(redis_server)
    stored = redis_server.command("HGET", "convlock:tracker:{s}", "n")
    assert stored == "2", "the in-flight message and its response were saved before exit"


@pytest.mark.slow
async def test_messages_cancelled_past_the_shutdown_timeout_release_their_locks(
    redis_server: RedisProcess, tmp_path: Path
) -> None:
    """Past --shutdown-timeout uvicorn cancels the requests in flight; their locks must still be released.

    The lease (30 s) is far longer than the test, so a lock key left behind
    could only have been left by a release that never reached Redis, e.g.
    because the stores were closed while the cancelled requests still
    needed them.
    """
    server = start_server(
        tmp_path, "--shutdown-timeout", "1", "--handler-timeout", "60",
        endpoints=endpoints(tmp_path, redis_server, lifetime=30), handler=HANDLER,
    )
    senders = [f"c{n}" for n in range(4)]
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            in_flight = [
                asyncio.create_task(http.post(WEBHOOK, json={"sender": sender, "message": "ctl:sleep:30"}))
                for sender in senders
            ]
            for sender in senders:
                await wait_until_held(http, sender)
            server.signal(signal.SIGTERM)
            assert await asyncio.to_thread(server.popen.wait, 20) == 0
            for task in in_flight:  # cut off, and told so in JSON
                cut_off = await task
                assert cut_off.status_code == 503, cut_off.text
                assert cut_off.json()["error"] == "shutting_down"
    finally:
        server.kill()
    await assert_lock_keys_drain(redis_server, server.log())
    for sender in senders:  # nothing of the cancelled messages was saved
        assert redis_server.command("HGET", f"convlock:tracker:{{{sender}}}", "n") is None
    assert "could not release" not in server.log()


@pytest.mark.slow
async def test_a_holder_frozen_past_its_lease_is_refused_with_409(redis_server: RedisProcess, tmp_path: Path) -> None:
    """A blocks its whole process for 3 s (a GC pause); its 1 s lease lapses and B takes over."""
    config = endpoints(tmp_path, redis_server, lifetime=1)
    a = start_server(tmp_path, endpoints=config, handler=HANDLER)
    b = start_server(tmp_path, endpoints=config, handler=HANDLER)
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            first = await http.post(f"{b.url}{WEBHOOK}", json={"sender": "f", "message": "first"})
            assert first.status_code == 200
            frozen = asyncio.create_task(http.post(f"{a.url}{WEBHOOK}", json={"sender": "f", "message": "ctl:block:3"}))
            held = await wait_until_held(http, "f", b.url)
            successor = await http.post(f"{b.url}{WEBHOOK}", json={"sender": "f", "message": "successor"})
            stale = await frozen
            record = (await http.get(f"{b.url}/conversations/f/tracker")).json()
            metrics = (await http.get(f"{a.url}/metrics")).text
        assert successor.status_code == 200
        assert successor.json()[0]["text"] == "#2: successor"
        assert stale.status_code == 409, stale.text
        assert stale.json()["error"] == "stale_ticket"
        assert [e["text"] for e in record["events"] if e["event"] == "user"] == ["first", "successor"]
        assert record["fence"] > held["ticket"]
        assert 'convlock_messages_total{outcome="stale"} 1.0' in metrics
    finally:
        assert b.stop() == 0
        assert a.stop() == 0


@pytest.mark.slow
async def test_a_redis_outage_gives_503_and_the_server_recovers(fresh_redis: RedisProcess, tmp_path: Path) -> None:
    server = start_server(tmp_path, endpoints=endpoints(tmp_path, fresh_redis), handler=HANDLER)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            assert (await http.post(WEBHOOK, json={"sender": "o", "message": "before"})).status_code == 200
            fresh_redis.stop()
            health = await http.get("/health")
            assert health.status_code == 503
            assert health.json()["status"] == "unavailable"
            assert str(fresh_redis.port) in health.json()["lock_store"]["reason"]
            down = await http.post(WEBHOOK, json={"sender": "o", "message": "during"})
            assert down.status_code == 503
            assert down.json()["error"] == "store_unavailable"
            assert str(fresh_redis.port) in down.json()["reason"]
            assert (await http.get("/conversations/o/tracker")).status_code == 503
            fresh_redis.start()
            await asyncio.sleep(0.2)
            assert (await http.get("/health")).status_code == 200
            after = await http.post(WEBHOOK, json={"sender": "o", "message": "after"})
            assert after.status_code == 200
            assert after.json()[0]["text"] == "#1: after"  # the restarted Redis is empty
    finally:
        assert server.stop() == 0


def test_force_release_is_disabled_without_a_token(redis_server: RedisProcess, tmp_path: Path) -> None:
    server = start_server(tmp_path, endpoints=endpoints(tmp_path, redis_server, tracker="in_memory"))
    try:
        response = httpx.delete(f"{server.url}/locks/x", headers={"Authorization": "Bearer anything"})
        assert response.status_code == 403
        assert "--auth-token" in response.json()["reason"]
        health = httpx.get(f"{server.url}/health").json()
        assert health["lock_store"]["backend"] == "redis"
        assert health["tracker_store"]["backend"] == "in_memory"
    finally:
        assert server.stop() == 0


@pytest.mark.slow
async def test_two_workers_share_the_redis_stores(redis_server: RedisProcess, tmp_path: Path) -> None:
    server = start_server(tmp_path, "--workers", "2", endpoints=endpoints(tmp_path, redis_server))
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:

            async def conversation(sender: str) -> list[str]:
                texts = []
                for i in range(10):
                    response = await http.post(WEBHOOK, json={"sender": sender, "message": f"m{i}"})
                    assert response.status_code == 200, response.text
                    texts.append(response.json()[0]["text"])
                return texts

            results = await asyncio.gather(*(conversation(f"w{n}") for n in range(8)))
        for texts in results:
            assert texts == [f"#{i + 1}: m{i}" for i in range(10)]
    finally:
        assert server.stop() == 0


@pytest.mark.slow
async def test_sigterm_to_a_multi_worker_server_drains_every_worker(
    redis_server: RedisProcess, tmp_path: Path
) -> None:
    """The parent relays SIGTERM; each worker finishes its messages in flight and releases its locks."""
    server = start_server(
        tmp_path, "--workers", "2", endpoints=endpoints(tmp_path, redis_server, lifetime=30), handler=HANDLER
    )
    senders = [f"d{n}" for n in range(6)]
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            in_flight = [
                asyncio.create_task(http.post(WEBHOOK, json={"sender": sender, "message": "ctl:sleep:1.5"}))
                for sender in senders
            ]
            for sender in senders:
                await wait_until_held(http, sender)
            server.signal(signal.SIGTERM)
            responses = [await task for task in in_flight]
        assert [r.status_code for r in responses] == [200] * len(senders), [r.text for r in responses]
        assert await asyncio.to_thread(server.popen.wait, 20) == 0, server.log()
    finally:
        server.kill()
    await assert_lock_keys_drain(redis_server, server.log())
    for sender in senders:
        assert redis_server.command("HGET", f"convlock:tracker:{{{sender}}}", "n") == "2"
