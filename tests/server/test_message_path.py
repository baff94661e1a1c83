"""The message path: the combined Redis path (two commands per message) and the separate one it falls back to."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from server_procs import start_server, write_endpoints

from convlock.bench.procs import RedisTarget
from convlock.bench.scenarios.lock_redis import CommandMonitor
from convlock.config import RedisSettings
from convlock.factory import create_lock_store
from convlock.redis import RedisLockStore
from convlock.server.message_path import StoresPath, choose_message_path
from convlock.server.redis_message_path import RedisMessagePath
from convlock.server.redis_tracker import RedisTrackerStore
from convlock.server.tracker import InMemoryTrackerStore, StaleTicketError, TrackerStore
from convlock.server.tracker_factory import create_tracker_store
from convlock.store import LockStore
from redis_procs import ClusterSetup, RedisProcess

WEBHOOK = "/webhooks/rest/webhook"
HANDLER = "convlock_test_handlers:control"


def endpoints(path: Path, redis_server: RedisProcess, *, tracker_db: int = 0, lifetime: float = 5) -> Path:
    def connection(db: int) -> dict[str, Any]:
        return {"url": redis_server.host, "port": redis_server.port, "db": db, "socket_timeout": 2}

    return write_endpoints(
        path / f"endpoints-{tracker_db}.yml",
        {
            "lock_store": {"type": "redis", "lifetime": lifetime, **connection(0)},
            "tracker_store": {"type": "redis", **connection(tracker_db)},
        },
    )


@pytest.mark.slow
async def test_an_uncontended_message_costs_two_redis_commands(redis_server: RedisProcess, tmp_path: Path) -> None:
    server = start_server(tmp_path, endpoints=endpoints(tmp_path, redis_server), handler=HANDLER, log_level="info")
    try:
        assert "message path: combined" in server.log()
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            warm = await http.post(WEBHOOK, json={"sender": "warm", "message": "hi"})
            assert warm.status_code == 200, warm.text
            with CommandMonitor(RedisTarget(redis_server.host, redis_server.port)) as monitor:
                replies = [
                    await http.post(WEBHOOK, json={"sender": "m1", "message": "one"}),
                    await http.post(WEBHOOK, json={"sender": "m1", "message": "two", "message_id": "id-2"}),
                    await http.post(WEBHOOK, json={"sender": "m2", "message": "three"}),
                ]
            repeat = await http.post(WEBHOOK, json={"sender": "m1", "message": "two", "message_id": "id-2"})
        assert [r.status_code for r in replies] == [200, 200, 200]
        assert [r.json()[0]["text"] for r in replies] == ["#1: one", "#2: two", "#1: three"]
        # One EVALSHA in (draw, load), one out (save, release): nothing else.
        assert monitor.commands == ["EVALSHA"] * 6, monitor.commands
        assert repeat.headers.get("idempotent-replayed") == "true"
        assert repeat.content == replies[1].content
    finally:
        assert server.stop() == 0
    assert redis_server.command("HGET", "convlock:tracker:{m1}", "n") == "4"


@pytest.mark.slow
async def test_stores_on_different_databases_keep_the_separate_path(
    redis_server: RedisProcess, tmp_path: Path
) -> None:
    config = endpoints(tmp_path, redis_server, tracker_db=3)
    server = start_server(tmp_path, endpoints=config, handler=HANDLER, log_level="info")
    try:
        assert "different Redis servers or databases" in server.log()
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            replies = [await http.post(WEBHOOK, json={"sender": "d", "message": str(n)}) for n in range(3)]
        assert [r.json()[0]["text"] for r in replies] == ["#1: 0", "#2: 1", "#3: 2"]
    finally:
        assert server.stop() == 0
    with redis.Redis(**redis_server.client_kwargs(), db=3) as tracker_db:
        assert tracker_db.hget("convlock:tracker:{d}", "n") == b"6"
    assert redis_server.command("EXISTS", "convlock:tracker:{d}") == 0  # nothing went to the lock's db


@pytest.mark.slow
async def test_woken_waiters_load_the_previous_save(redis_server: RedisProcess, tmp_path: Path) -> None:
    """Messages that queue (in one process and across two) each see every save before theirs.

    A waiter is granted by a hand-off, not by the combined draw, so it loads
    on its own; if that load missed its predecessor's save, two messages
    would report the same turn.
    """
    config = endpoints(tmp_path, redis_server)
    servers = [start_server(tmp_path, endpoints=config, handler=HANDLER) for _ in range(2)]
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            sends = [
                http.post(
                    f"{servers[n % 2].url}{WEBHOOK}", json={"sender": "queue", "message": f"ctl:sleep:0.0{n % 3}"}
                )
                for n in range(16)
            ]
            replies = await asyncio.gather(*sends)
            record = (await http.get(f"{servers[0].url}/conversations/queue/tracker")).json()
    finally:
        for server in servers:
            assert server.stop() == 0
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    turns = sorted(int(r.json()[0]["text"].split(":", 1)[0].lstrip("#")) for r in replies)
    assert turns == list(range(1, 17))
    users = [e for e in record["events"] if e["event"] == "user"]
    assert [e["turn"] for e in users] == list(range(1, 17))
    tickets = [e["ticket"] for e in users]
    assert tickets == sorted(tickets)  # saved in ticket order: FIFO held
    assert record["state"]["turns"] == 16


async def test_the_combined_path_is_taken_only_where_it_keeps_every_promise(redis_server: RedisProcess) -> None:
    here = RedisSettings(url=redis_server.host, port=redis_server.port, db=0)
    lock = RedisLockStore(here)
    trackers = {
        "same": RedisTrackerStore.from_settings(here),
        "other db": RedisTrackerStore.from_settings(here.model_copy(update={"db": 2})),
        "other user": RedisTrackerStore.from_settings(here.model_copy(update={"username": "u", "password": "p"})),
        "replicas": RedisTrackerStore.from_settings(here, min_replicas_acked=1),
    }
    try:
        assert isinstance(choose_message_path(lock, trackers["same"]), RedisMessagePath)
        for name in ("other db", "other user", "replicas"):
            path = choose_message_path(lock, trackers[name])
            assert isinstance(path, StoresPath), name
        assert "min_replicas_acked is 1" in choose_message_path(lock, trackers["replicas"]).describe()
        assert isinstance(choose_message_path(lock, InMemoryTrackerStore()), StoresPath)
        # A client passed in: its server is unknown, so no sharing.
        client_lock = RedisLockStore(redis.asyncio.Redis(**redis_server.client_kwargs()))
        assert "client passed in" in choose_message_path(client_lock, trackers["same"]).describe()
        await client_lock.aclose()
        await client_lock.client.aclose()
    finally:
        await lock.aclose()
        for tracker in trackers.values():
            await tracker.aclose()


def user(text: str) -> dict[str, Any]:
    return {"event": "user", "text": text}


def on(redis_server: RedisProcess, prefix: str) -> dict[str, Any]:
    """A store block for ``redis_server``'s database 0 under ``prefix``."""
    return {"type": "redis", "url": redis_server.host, "port": redis_server.port, "db": 0, "key_prefix": prefix}


@contextlib.asynccontextmanager
async def combined(
    block: dict[str, Any], **tracker: Any
) -> AsyncIterator[tuple[LockStore, TrackerStore, RedisMessagePath]]:
    """Stores built from ``block`` (the tracker's with ``tracker`` on top), their combined path; closed after."""
    lock, store = create_lock_store(block), create_tracker_store({**block, **tracker})
    try:
        path = choose_message_path(lock, store)
        assert isinstance(path, RedisMessagePath)
        yield lock, store, path
    finally:
        await lock.aclose()
        await store.aclose()


async def test_a_revoked_turns_save_is_refused_and_its_successors_state_stands(redis_server: RedisProcess) -> None:
    async with combined(on(redis_server, "stale")) as (lock, _, path):
        async with path.turn("s", wait_timeout=None, message_id=None) as old:
            assert (await old.load()).event_count == 0
            assert await lock.force_release("s") == old.ticket  # an operator revokes it mid-message
            async with path.turn("s", wait_timeout=None, message_id="new") as new:
                assert new.ticket > old.ticket
                assert (await new.load()).event_count == 0
                await new.save([user("new")], {"by": "new"}, "[]")
            with pytest.raises(StaleTicketError):
                await old.save([user("old")], {"by": "old"}, None)
        async with path.turn("s", wait_timeout=None, message_id=None) as after:
            record = await after.load()
        assert record.state == {"by": "new"}
        assert [e["text"] for e in record.events] == ["new"]
        # The refused save released its ticket in the same script: no lock keys are left.
        assert [k for k in redis_server.command("KEYS", "stale:*") if ":tracker:" not in k] in ([], ["stale:{s}:s"])


async def test_a_turn_knows_whether_its_lock_was_granted_at_once(redis_server: RedisProcess) -> None:
    # process_message skips a trip through the event loop before its
    # "has the client gone?" check only for a turn granted at once.
    async with combined(on(redis_server, "once")) as (lock, tracker, path):
        async with path.turn("o", wait_timeout=None, message_id=None) as first:
            assert first.granted_at_once
            second_turn = path.turn("o", wait_timeout=5, message_id=None)
            entered = asyncio.create_task(second_turn.__aenter__())
            await asyncio.sleep(0.1)
            assert not entered.done()
            await first.save([user("first")], {}, None)
        second = await asyncio.wait_for(entered, 5)
        try:
            assert not second.granted_at_once
            assert [e["text"] for e in (await second.load()).events] == ["first"]
        finally:
            await second_turn.__aexit__(None, None, None)
        separate = StoresPath(lock, tracker)
        async with separate.turn("o", wait_timeout=None, message_id=None) as alone:
            assert alone.granted_at_once  # the lock store's own hold tells
            queued_turn = separate.turn("o", wait_timeout=5, message_id=None)
            queued_entry = asyncio.create_task(queued_turn.__aenter__())
            await asyncio.sleep(0.1)
            assert not queued_entry.done()
        queued = await asyncio.wait_for(queued_entry, 5)
        try:
            assert not queued.granted_at_once
        finally:
            await queued_turn.__aexit__(None, None, None)


async def test_the_combined_path_runs_on_a_cluster(redis_cluster: ClusterSetup) -> None:
    block = {"type": "redis", "deployment_mode": "cluster", "endpoints": redis_cluster.endpoints(), "key_prefix": "mp"}
    nodes = set()
    async with combined(block) as (_, tracker, path):
        assert isinstance(tracker, RedisTrackerStore)
        for n in range(8):
            cid = f"conv-{n}"
            nodes.add(redis_cluster.node_for_key(tracker.key(cid)).port)
            async with path.turn(cid, wait_timeout=None, message_id="m") as turn:
                assert (await turn.load()).event_count == 0
                await turn.save([user(cid)], {"n": n}, '["reply"]')
            async with path.turn(cid, wait_timeout=None, message_id="m") as turn:
                assert (await turn.load()).replay == '["reply"]'
            async with path.turn(cid, wait_timeout=None, message_id=None) as turn:
                record = await turn.load()
                assert (record.state, record.event_count, record.turn) == ({"n": n}, 1, 1)
        assert len(nodes) > 1  # the conversations landed on different nodes


async def test_the_combined_path_reads_and_extends_a_conversation_stored_as_event_fields(
    redis_server: RedisProcess,
) -> None:
    """An earlier version's record (one hash field per event) goes on through both scripts."""
    fields = {f"e:{i}": json.dumps(user(f"old{i}")) for i in range(1, 4)}
    redis_server.command("HSET", "lf:tracker:{c}", "fence", 1, "ticket", 1, "state", "{}", "n", 3, "u", 3,
                         *[part for item in fields.items() for part in item])
    async with combined(on(redis_server, "lf"), max_event_history=5) as (_, _, path):
        for text in ("a", "b", "c"):
            async with path.turn("c", wait_timeout=None, message_id=None) as turn:
                record = await turn.load()
                await turn.save([user(text)], {"last": text}, None)
        assert [e["text"] for e in record.events] == ["old1", "old2", "old3", "a", "b"]
        async with path.turn("c", wait_timeout=None, message_id=None) as turn:
            record = await turn.load()
        assert [e["text"] for e in record.events] == ["old2", "old3", "a", "b", "c"]
        assert (record.event_count, record.turn, record.state) == (6, 6, {"last": "c"})
        listed = redis_server.command("LRANGE", "lf:tracker:{c}:ev", 0, -1)
        assert [json.loads(e)["text"] for e in listed] == ["a", "b", "c"]  # the old fields stay fields
