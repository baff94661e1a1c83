"""Delivery guarantees of ``convlock run``: exactly once by message ID, abandoned and late requests not processed.

Real servers, real sockets: a client that "disconnects" closes its TCP
connection, and a repeat is a second HTTP request.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_procs import ServerProcess, all_events, start_server, write_endpoints

from redis_procs import RedisProcess

WEBHOOK = "/webhooks/rest/webhook"
HANDLER = "convlock_test_handlers:control"


def redis_endpoints(path: Path, redis: RedisProcess, prefix: str = "delivery") -> Path:
    connection: dict[str, Any] = {"url": redis.host, "port": redis.port, "db": 0, "key_prefix": prefix}
    return write_endpoints(path / f"{prefix}.yml", {
        "lock_store": {"type": "redis", "lifetime": 5, **connection},
        "tracker_store": {"type": "redis", **connection},
    })


@pytest.fixture(params=["in_memory", "redis"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerProcess]:
    endpoints = None
    if request.param == "redis":
        endpoints = redis_endpoints(tmp_path, request.getfixturevalue("redis_server"))
    proc = start_server(tmp_path, endpoints=endpoints, handler=HANDLER)
    yield proc
    assert proc.stop() == 0, proc.log()


async def user_events(http: httpx.AsyncClient, base: str, sender: str) -> list[dict[str, Any]]:
    events = await all_events(f"{base or str(http.base_url).rstrip('/')}/conversations/{sender}/tracker")
    return [event for event in events if event["event"] == "user"]


async def metric(http: httpx.AsyncClient, base: str, outcome: str) -> float:
    text = (await http.get(f"{base}/metrics")).text
    for line in text.splitlines():
        if line.startswith(f'convlock_messages_total{{outcome="{outcome}"}}'):
            return float(line.split()[-1])
    return 0.0


async def wait_for_waiters(http: httpx.AsyncClient, base: str, sender: str, count: int) -> None:
    for _ in range(500):
        body = (await http.get(f"{base}/locks/{sender}")).json()
        if body["serving"] is not None and len(body["waiting"]) == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{sender}: never {count} waiting")


async def send_and_hang_up(port: int, body: dict[str, Any]) -> asyncio.StreamWriter:
    """POST ``body`` on a raw socket and return the writer, so the caller decides when to close it."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = json.dumps(body).encode()
    writer.write(
        b"POST " + WEBHOOK.encode() + b" HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        + b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw
    )
    await writer.drain()
    return writer


async def test_a_repeated_message_id_is_processed_once_and_replayed_exactly(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        first = await http.post(WEBHOOK, json={"sender": "r", "message": "hello ✓", "message_id": "m-1"})
        again = await http.post(WEBHOOK, json={"sender": "r", "message": "hello ✓", "message_id": "m-1"})
        assert first.status_code == again.status_code == 200
        assert first.json() == [{"recipient_id": "r", "text": "#1: hello ✓"}]
        assert again.content == first.content
        assert "idempotent-replayed" not in first.headers
        assert again.headers["idempotent-replayed"] == "true"
        # The header means the same as the body key.
        keyed = await http.post(WEBHOOK, json={"sender": "r", "message": "two"}, headers={"Idempotency-Key": "m-2"})
        keyed_again = await http.post(WEBHOOK, json={"sender": "r", "message": "two", "message_id": "m-2"})
        assert keyed.json() == [{"recipient_id": "r", "text": "#2: two"}]
        assert keyed_again.content == keyed.content
        assert keyed_again.headers["idempotent-replayed"] == "true"
        # Without an ID, a message is a new message every time.
        plain = [await http.post(WEBHOOK, json={"sender": "r", "message": "plain"}) for _ in range(2)]
        assert [p.json()[0]["text"] for p in plain] == ["#3: plain", "#4: plain"]
        users = await user_events(http, "", "r")
        assert [(e["text"], e["turn"]) for e in users] == [("hello ✓", 1), ("two", 2), ("plain", 3), ("plain", 4)]
        assert [e["message_id"] for e in users[:2]] == ["m-1", "m-2"]
        assert all(len(e["message_id"]) == 32 for e in users[2:]), "made-up IDs for messages sent without one"
        tracker = (await http.get("/conversations/r/tracker")).json()
        bots = [e for e in tracker["events"] if e["event"] == "bot"]
        assert [e["message_id"] for e in bots] == [e["message_id"] for e in users]
        assert tracker["state"] == {"turns": 4}, "the handler ran once per distinct message"
        assert await metric(http, "", "replayed") == 2


async def test_bad_message_ids_and_deadlines_are_4xx(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        cases: list[tuple[dict[str, Any], dict[str, str], int, str]] = [
            ({"message_id": ""}, {}, 422, "message_id"),
            ({"message_id": "x" * 257}, {}, 422, "message_id"),
            ({"message_id": 7}, {}, 422, "message_id"),
            ({}, {"Idempotency-Key": "k" * 300}, 422, "Idempotency-Key"),
            ({"message_id": "a"}, {"Idempotency-Key": "b"}, 422, "differ"),
            ({}, {"X-Request-Timeout": "soon"}, 400, "X-Request-Timeout"),
            ({}, {"X-Request-Timeout": "-1"}, 400, "X-Request-Timeout"),
            ({}, {"X-Request-Timeout": "nan"}, 400, "X-Request-Timeout"),
        ]
        for extra, headers, status, reason in cases:
            response = await http.post(WEBHOOK, json={"sender": "b", "message": "m", **extra}, headers=headers)
            assert response.status_code == status, (extra, headers, response.text)
            assert reason in response.json()["reason"]
        assert await user_events(http, "", "b") == []


async def test_a_client_that_hangs_up_while_waiting_is_not_processed(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        holder = asyncio.create_task(http.post(WEBHOOK, json={"sender": "h", "message": "ctl:sleep:1"}))
        await wait_for_waiters(http, "", "h", 0)
        writer = await send_and_hang_up(server.port, {"sender": "h", "message": "abandoned"})
        await wait_for_waiters(http, "", "h", 1)
        writer.close()
        await writer.wait_closed()
        assert (await holder).status_code == 200
        after = await http.post(WEBHOOK, json={"sender": "h", "message": "next"})
        assert after.json() == [{"recipient_id": "h", "text": "#2: next"}], "no gap in the turns"
        users = await user_events(http, "", "h")
        assert [(e["text"], e["turn"]) for e in users] == [("ctl:sleep:1", 1), ("next", 2)]
        assert await metric(http, "", "abandoned") == 1
        assert (await http.get("/locks/h")).json()["serving"] is None


async def test_process_abandoned_processes_fire_and_forget_messages(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--process-abandoned", handler=HANDLER)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            holder = asyncio.create_task(http.post(WEBHOOK, json={"sender": "f", "message": "ctl:sleep:0.5"}))
            await wait_for_waiters(http, "", "f", 0)
            writer = await send_and_hang_up(server.port, {"sender": "f", "message": "fire and forget"})
            await wait_for_waiters(http, "", "f", 1)
            writer.close()
            await holder
            for _ in range(200):
                users = await user_events(http, "", "f")
                if len(users) == 2:
                    break
                await asyncio.sleep(0.02)
            assert [e["text"] for e in users] == ["ctl:sleep:0.5", "fire and forget"]
            assert await metric(http, "", "abandoned") == 0
    finally:
        assert server.stop() == 0


async def test_a_deadline_that_passes_in_the_queue_gets_504_and_is_not_processed(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        holder = asyncio.create_task(http.post(WEBHOOK, json={"sender": "d", "message": "ctl:sleep:1.5"}))
        await wait_for_waiters(http, "", "d", 0)
        late = await http.post(
            WEBHOOK, json={"sender": "d", "message": "late", "message_id": "late-1"}, headers={"X-Request-Timeout": "0.3"}
        )
        assert late.status_code == 504, late.text
        assert late.json()["error"] == "deadline_exceeded"
        assert (await http.get("/locks/d")).json()["waiting"] == [], "the ticket was withdrawn"
        assert (await holder).status_code == 200
        # A deadline that leaves time is no obstacle, and the late message's ID was never stored.
        retry = await http.post(
            WEBHOOK, json={"sender": "d", "message": "late", "message_id": "late-1"}, headers={"X-Request-Timeout": "10"}
        )
        assert retry.json() == [{"recipient_id": "d", "text": "#2: late"}]
        assert "idempotent-replayed" not in retry.headers
        assert await metric(http, "", "deadline") == 1


async def test_repeats_sent_at_once_to_two_replicas_are_stored_once(tmp_path: Path, redis_server: RedisProcess) -> None:
    config = redis_endpoints(tmp_path, redis_server, "twice")
    servers = [start_server(tmp_path, endpoints=config, handler=HANDLER, wait=False) for _ in range(2)]
    try:
        for proc in servers:
            proc.wait_ready()
        async with httpx.AsyncClient(timeout=30) as http:
            for i in range(5):
                body = {"sender": "t", "message": "ctl:sleep:0.2", "message_id": f"id-{i}"}
                a, b = await asyncio.gather(*(http.post(f"{proc.url}{WEBHOOK}", json=body) for proc in servers))
                assert a.status_code == b.status_code == 200, (a.text, b.text)
                assert a.content == b.content
                assert sorted(r.headers.get("idempotent-replayed", "no") for r in (a, b)) == ["no", "true"]
            users = await user_events(http, servers[0].url, "t")
            assert [(e["message_id"], e["turn"]) for e in users] == [(f"id-{i}", i + 1) for i in range(5)]
    finally:
        assert [proc.stop() for proc in servers] == [0, 0]


@pytest.mark.slow
async def test_a_frozen_replica_does_not_process_late_what_its_clients_gave_up_on(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    connection: dict[str, Any] = {"url": redis_server.host, "port": redis_server.port, "db": 0, "key_prefix": "frozen"}
    config = write_endpoints(tmp_path / "frozen.yml", {
        "lock_store": {"type": "redis", "lifetime": 1, **connection},
        "tracker_store": {"type": "redis", **connection},
    })
    frozen, other = (start_server(tmp_path, endpoints=config, handler=HANDLER, wait=False) for _ in range(2))
    try:
        frozen.wait_ready()
        other.wait_ready()
        async with httpx.AsyncClient(timeout=30) as http:
            holder = asyncio.create_task(http.post(f"{other.url}{WEBHOOK}", json={"sender": "z", "message": "ctl:sleep:1.5"}))
            await wait_for_waiters(http, other.url, "z", 0)
            gave_up = [
                asyncio.create_task(http.post(
                    f"{frozen.url}{WEBHOOK}", json={"sender": "z", "message": f"gave up {i}"}, timeout=1.0
                ))
                for i in range(3)
            ]
            await wait_for_waiters(http, other.url, "z", 3)
            frozen.signal(signal.SIGSTOP)
            for task in gave_up:
                with pytest.raises(httpx.TimeoutException):
                    await task
            assert (await holder).status_code == 200
            # The frozen replica's waiting tickets lapse; the conversation moves on without them.
            after = await http.post(f"{other.url}{WEBHOOK}", json={"sender": "z", "message": "after"})
            assert after.json() == [{"recipient_id": "z", "text": "#2: after"}]
            frozen.signal(signal.SIGCONT)
            for _ in range(300):
                if await metric(http, frozen.url, "abandoned") == 3:
                    break
                await asyncio.sleep(0.02)
            assert await metric(http, frozen.url, "abandoned") == 3, frozen.log()
            users = await user_events(http, other.url, "z")
            assert [e["text"] for e in users] == ["ctl:sleep:1.5", "after"], "nothing stored late"
    finally:
        for proc in (frozen, other):
            proc.signal(signal.SIGCONT)
            assert proc.stop() == 0, proc.log()


async def test_a_store_without_message_ids_refuses_them_rather_than_break_the_promise(tmp_path: Path) -> None:
    config = write_endpoints(tmp_path / "old.yml", {"tracker_store": {"type": "convlock_test_stores.OldTrackerStore"}})
    server = start_server(tmp_path, endpoints=config)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            plain = await http.post(WEBHOOK, json={"sender": "o", "message": "no id"})
            assert plain.json() == [{"recipient_id": "o", "text": "#1: no id"}]
            keyed = await http.post(WEBHOOK, json={"sender": "o", "message": "with id", "message_id": "x"})
            assert keyed.status_code == 501
            assert "does not remember message IDs" in keyed.json()["reason"]
            assert await metric(http, "", "refused") == 1
            assert [e["text"] for e in await user_events(http, "", "o")] == ["no id"]
    finally:
        assert server.stop() == 0
    assert "takes no message_id" in server.log()
