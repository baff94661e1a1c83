"""Cost per message independent of conversation length: the window, stored turns, paging, retention.

Against the in-memory store and a real redis-server alike: a conversation of
10,000 events loads only its last ``max_event_history`` events and a stored
turn number, older events come a page at a time, in order, and retention
drops the oldest events one for one.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_procs import start_server, write_endpoints

from convlock.config import RedisSettings
from convlock.redis.connection import create_client
from convlock.server import Conversation
from convlock.server.redis_tracker import RedisTrackerStore
from convlock.server.tracker import InMemoryTrackerStore, TrackerStore
from redis_procs import RedisProcess


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_server: RedisProcess) -> AsyncIterator[TrackerStore]:
    """Each test runs on both stores, with a window of 20 and 1,000 events kept."""
    if request.param == "memory":
        yield InMemoryTrackerStore(max_event_history=20, retain_events=1000)
        return
    async with _redis_store(redis_server, "win", max_event_history=20, retain_events=1000) as redis_store:
        yield redis_store


@contextlib.asynccontextmanager
async def _redis_store(redis_server: RedisProcess, prefix: str, **options: Any) -> AsyncIterator[RedisTrackerStore]:
    """A Redis tracker store under its own key prefix; every key under it is deleted afterwards."""
    settings = RedisSettings(url=redis_server.host, port=redis_server.port, db=0, key_prefix=prefix)
    store = RedisTrackerStore(create_client(settings, retries=0), key_prefix=prefix, **options)
    try:
        yield store
    finally:
        await store.aclose()
        with redis_server.client() as client:
            for key in client.scan_iter(match=f"{prefix}:*"):
                client.delete(key)


def _turn(i: int) -> list[dict[str, Any]]:
    return [{"event": "user", "text": f"u{i}", "turn": i}, {"event": "bot", "text": f"b{i}", "turn": i}]


async def _fill(store: TrackerStore, cid: str, turns: int, *, per_save: int = 100) -> None:
    """``turns`` user+bot pairs, saved ``per_save`` turns at a time (one ticket per save)."""
    for start in range(1, turns + 1, per_save):
        events = [e for i in range(start, min(turns, start + per_save - 1) + 1) for e in _turn(i)]
        await store.save(cid, ticket=start, new_events=events, state={"last": start})


async def test_a_load_returns_the_window_and_stored_counts(store: TrackerStore) -> None:
    await _fill(store, "long", 500)  # 1,000 events, all retained
    record = await store.load("long", ticket=10_000)
    assert record.event_count == 1000
    assert record.turn == 500
    assert [e["text"] for e in record.events] == [f"{k}{i}" for i in range(491, 501) for k in "ub"]
    # What a load carries does not grow with the conversation: the same
    # window of a conversation 100 times shorter is as big.
    await _fill(store, "short", 5 + 10)
    short = await store.load("short", ticket=10_000)
    assert len(json.dumps(list(record.events))) <= len(json.dumps(list(short.events))) * 1.2
    assert len(short.events) == len(record.events) == 20


async def test_pages_return_every_retained_event_in_order(store: TrackerStore) -> None:
    await _fill(store, "paged", 250)
    seen: list[str] = []
    after = 0
    while page := await store.events("paged", after=after, limit=37):
        seen += [e["text"] for e in page]
        after += len(page)
    assert seen == [f"{k}{i}" for i in range(1, 251) for k in "ub"]
    assert await store.events("paged", after=500, limit=10) == []


async def test_older_events_walk_back_from_the_window(store: TrackerStore) -> None:
    await _fill(store, "walk", 100)
    record = await store.load("walk", ticket=10_000)

    async def pager(after: int, limit: int) -> list[dict[str, Any]]:
        return await store.events("walk", after=after, limit=limit)

    conversation = Conversation("walk", tuple(record.events), record.state, 101, 10_000, record.event_count or 0, pager)
    collected = list(conversation.events)
    before = conversation.event_count - len(conversation.events) + 1
    while older := await conversation.older_events(30, before=before):
        collected = older + collected
        before -= len(older)
    assert [e["text"] for e in collected] == [f"{k}{i}" for i in range(1, 101) for k in "ub"]
    assert await conversation.older_events(5, before=1) == []


async def test_retention_drops_the_oldest_events_one_for_one(redis_server: RedisProcess) -> None:
    async with _redis_store(redis_server, "ret", max_event_history=10, retain_events=50) as redis_store:
        stores: list[TrackerStore] = [InMemoryTrackerStore(max_event_history=10, retain_events=50), redis_store]
        for store in stores:
            await _fill(store, "kept", 60, per_save=7)  # 120 events, 50 kept
            record = await store.load("kept")
            assert record.event_count == 120
            assert record.turn == 60
            everything = await store.events("kept", after=0, limit=1000)
            assert [e["text"] for e in everything] == [f"{k}{i}" for i in range(36, 61) for k in "ub"]
        with redis_server.client() as client:
            assert client.llen("ret:tracker:{kept}:ev") == 50
            assert not [f for f in client.hkeys("ret:tracker:{kept}") if f.startswith("e:")]


def test_the_window_may_not_exceed_what_is_kept() -> None:
    with pytest.raises(ValueError, match="cannot exceed retain_events"):
        InMemoryTrackerStore(max_event_history=100, retain_events=10)


async def test_a_handler_sees_the_window_of_a_10000_event_conversation(
    redis_server: RedisProcess, tmp_path: Any
) -> None:
    settings = RedisSettings(url=redis_server.host, port=redis_server.port, db=0, key_prefix="w10k")
    filler = RedisTrackerStore(create_client(settings, retries=0), key_prefix="w10k")
    await _fill(filler, "big", 5000, per_save=500)  # 10,000 events
    await filler.aclose()
    connection = {"url": redis_server.host, "port": redis_server.port, "db": 0, "key_prefix": "w10k"}
    endpoints = write_endpoints(
        tmp_path / "endpoints.yml",
        {"lock_store": {"type": "redis", **connection}, "tracker_store": {"type": "redis", **connection}},
    )
    server = start_server(tmp_path, endpoints=endpoints, handler="convlock_test_handlers:control")
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            reply = await http.post("/webhooks/rest/webhook", json={"sender": "big", "message": "ctl:window"})
            assert reply.status_code == 200, reply.text
            # The default window of 100 events, the stored count and turn, and
            # older events read on demand (the three before the window).
            assert reply.json()[0]["text"] == "100/10000/5001/b4949,u4950,b4950"
            page = (await http.get("/conversations/big/tracker", params={"after": 9990, "limit": 5})).json()
            assert [e["text"] for e in page["events"]] == ["u4996", "b4996", "u4997", "b4997", "u4998"]
            assert page["event_count"] == 10002
            assert page["next_after"] == 9995
    finally:
        server.stop()
        with redis_server.client() as client:
            for key in client.scan_iter(match="w10k:*"):
                client.delete(key)


async def test_the_window_is_the_last_events_whatever_the_save_sizes(redis_server: RedisProcess) -> None:
    """Saves of 0 to 12 events, below, at and above a window of 7: each load sees exactly the last 7."""
    rng = random.Random(5)
    texts: list[str] = []
    async with _redis_store(redis_server, "sizes", max_event_history=7) as store:
        for ticket in range(1, 60):
            new = [f"t{ticket}e{k}" for k in range(rng.randrange(13))]
            texts += new
            events = [{"event": "bot", "text": text} for text in new]
            await store.save("sizes", ticket=ticket, new_events=events, state={})
            record = await store.load("sizes", ticket=ticket)
            assert [e["text"] for e in record.events] == texts[-7:]
            assert record.event_count == len(texts)


@pytest.mark.parametrize("with_turns", [True, False])
async def test_a_conversation_stored_as_event_fields_reads_on_across_the_move(
    redis_server: RedisProcess, with_turns: bool
) -> None:
    """A record in the earlier layout (one hash field ``e:<i>`` per event) keeps working.

    Its events stay fields until retention drops them; newer ones go to the
    list. Every window, peek and page reads across the boundary in order, and
    the fields go one for one as events pass ``retain_events``. Records older
    still have no stored turn (``u``): the store counts once.
    """
    key = "legacy:tracker:{old}"
    texts = [f"old{i}" for i in range(1, 31)]
    head: dict[str, Any] = {"fence": 3, "ticket": 3, "state": json.dumps({"k": 1}), "n": len(texts)}
    if with_turns:
        head["u"] = 15
    with redis_server.client() as client:
        client.hset(key, mapping={**head, **{f"e:{i}": json.dumps(_event(t)) for i, t in enumerate(texts, 1)}})
    rng = random.Random(7)
    async with _redis_store(redis_server, "legacy", max_event_history=8, retain_events=40) as store:
        record = await store.load("old")
        assert [e["text"] for e in record.events] == texts[-8:]
        assert (record.event_count, record.state) == (30, {"k": 1})
        for ticket in range(4, 30):
            new = [f"t{ticket}e{k}" for k in range(rng.randrange(5))]
            await store.save("old", ticket=ticket, new_events=[_event(t) for t in new], state={"k": ticket})
            texts += new
            kept = texts[-40:]
            record = await store.load("old", ticket=ticket)
            assert [e["text"] for e in record.events] == kept[-8:]
            assert record.event_count == len(texts)
            assert [e["text"] for e in (await store.load("old")).events] == kept[-8:]
            after, paged = 0, []
            while page := await store.events("old", after=after, limit=rng.randrange(1, 12)):
                paged += [e["text"] for e in page]
                after = len(texts) - len(kept) + len(paged)
            assert paged == kept
            with redis_server.client() as client:
                fields = [f for f in client.hkeys(key) if f.startswith("e:")]
            # Fields left: the first 30 events minus those past retention.
            assert len(fields) == 30 - min(30, max(0, len(texts) - 40))
        assert len(texts) - 40 > 30  # the run went past every field
        record = await store.load("old", ticket=30)
        assert record.turn == (15 if with_turns else 0)  # bot events only: the turn never moved


def _event(text: str) -> dict[str, Any]:
    return {"event": "bot", "text": text}


class _OlderSave:
    """The SAVE script of the version before the list (fields_layout_save.lua), as an older replica runs it."""

    def __init__(self, client: Any, store: RedisTrackerStore, conversation_id: str) -> None:
        self._script = client.register_script((Path(__file__).parent / "fields_layout_save.lua").read_text())
        record, _, ids, order = store.keys(conversation_id)
        self._keys = [record, ids, order]  # it knew no events list
        self._retain = store.retain_events

    def save(self, ticket: int, events: list[dict[str, Any]], *, state: dict[str, Any]) -> None:
        # ARGV: ticket, TTL (0: none), state, message ID, reply, remember, users, retain, events.
        self._script(keys=self._keys, args=[
            ticket, 0, json.dumps(state), "", "[]", 1000, 0, self._retain, *[json.dumps(e) for e in events],
        ])


async def test_an_older_replica_appending_fields_during_a_rolling_upgrade_loses_nothing(
    redis_server: RedisProcess,
) -> None:
    """Saves by this version and by the one before it (fields), interleaved at random, read as one history.

    The older version's SAVE script (kept verbatim in fields_layout_save.lua)
    appends fields after the list; every read of this version sees them in
    place, and its next save moves them onto the list. A run of more than
    ``retain_events`` older appends (a long rollout) is covered too.
    """
    rng = random.Random(11)
    texts: list[str] = []
    run = longest_run = 0  # events the older version appended in a row
    async with _redis_store(redis_server, "mixed", max_event_history=8, retain_events=30) as store:
        record_key = store.key("c")
        with redis_server.client() as client:
            older = _OlderSave(client, store, "c")
            for ticket in range(1, 120):
                long_run = 60 <= ticket < 75  # 45 events in a row by the older version
                new = [f"t{ticket}e{k}" for k in range(3 if long_run else rng.randrange(5))]
                events = [_event(t) for t in new]
                if ticket < 10 or long_run or rng.random() < 0.3:
                    older.save(ticket, events, state={"t": ticket})
                    run += len(events)
                    longest_run = max(longest_run, run)
                else:
                    await store.save("c", ticket=ticket, new_events=events, state={"t": ticket})
                    run = 0
                    # This version's save moved the older one's fields onto the list:
                    # only those from before its first save (up to b) are left.
                    numbers = [int(f[2:]) for f in client.hkeys(record_key) if f.startswith("e:")]
                    assert max(numbers, default=0) <= int(client.hget(record_key, "b")), ticket
                texts += new
                kept = texts[-30:]
                record = await store.load("c", ticket=ticket)
                assert [e["text"] for e in record.events] == kept[-8:], ticket
                assert (record.event_count, record.state) == (len(texts), {"t": ticket})
                paged: list[str] = []
                while page := await store.events("c", after=len(texts) - len(kept) + len(paged), limit=7):
                    paged += [e["text"] for e in page]
                assert paged == kept, ticket
            assert longest_run > 30  # an older run longer than retain_events was read across


async def test_a_long_run_of_an_older_replicas_appends_moves_in_pieces(redis_server: RedisProcess) -> None:
    """9,000 events appended as fields by the older version move onto the list in one save, in order."""
    async with _redis_store(redis_server, "run", max_event_history=5) as store:
        record_key, events_key = store.keys("c")[:2]
        await store.save("c", ticket=1, new_events=[_event("first")], state={})
        texts = ["first"]
        with redis_server.client() as client:
            older = _OlderSave(client, store, "c")
            for ticket in range(2, 20):  # 18 saves of 500: more than Lua's unpack takes at once
                new = [f"t{ticket}e{k}" for k in range(500)]
                older.save(ticket, [_event(t) for t in new], state={})
                texts += new
            await store.save("c", ticket=20, new_events=[_event("last")], state={})
            texts.append("last")
            assert not [f for f in client.hkeys(record_key) if f.startswith("e:")]
            assert client.llen(events_key) == len(texts) == 9002
        record = await store.load("c")
        assert [e["text"] for e in record.events] == texts[-5:]
        page = await store.events("c", after=1, limit=3)
        assert [e["text"] for e in page] == texts[1:4]
