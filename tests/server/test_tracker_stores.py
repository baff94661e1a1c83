"""The fencing rules of both tracker stores, against a real redis-server for the Redis one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from convlock import ConfigError
from convlock.server.redis_tracker import RedisTrackerStore
from convlock.server.tracker import EncodedState, InMemoryTrackerStore, StaleTicketError, TrackerStore
from convlock.server.tracker_factory import create_tracker_store
from redis_procs import ClusterSetup, RedisProcess, SentinelSetup

# Lock tickets from RedisLockStore are the Redis clock in microseconds: big numbers.
BIG = 1_795_888_028_406_093


@pytest.fixture(params=["in_memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[TrackerStore]:
    if request.param == "in_memory":
        yield InMemoryTrackerStore()
        return
    redis_server: RedisProcess = request.getfixturevalue("redis_server")
    tracker = create_tracker_store({"type": "redis", "url": redis_server.host, "port": redis_server.port, "db": 0})
    assert isinstance(tracker, RedisTrackerStore)
    yield tracker
    await tracker.aclose()


def event(text: str) -> dict[str, Any]:
    return {"event": "user", "text": text}


async def test_an_unknown_conversation_loads_empty(store: TrackerStore) -> None:
    record = await store.load("nobody")
    assert (record.events, record.state, record.ticket, record.fence) == ([], {}, 0, 0)


async def test_saves_append_events_and_replace_state(store: TrackerStore) -> None:
    await store.load("c", ticket=BIG)
    await store.save("c", ticket=BIG, new_events=[event("a")], state={"n": 1})
    await store.load("c", ticket=BIG + 1)
    await store.save("c", ticket=BIG + 1, new_events=[event("b"), {"event": "bot", "text": "é ✓"}], state={"n": 2})
    record = await store.load("c")
    assert record.events == [event("a"), event("b"), {"event": "bot", "text": "é ✓"}]
    assert record.state == {"n": 2}
    assert (record.ticket, record.fence) == (BIG + 1, BIG + 1)


async def test_a_load_raises_the_fence_and_a_lower_ticket_is_then_refused(store: TrackerStore) -> None:
    await store.save("c", ticket=BIG, new_events=[event("first")], state={"v": "first"})
    await store.load("c", ticket=BIG)  # the stale holder loaded ...
    await store.load("c", ticket=BIG + 5)  # ... then its successor did
    with pytest.raises(StaleTicketError) as refused:
        await store.save("c", ticket=BIG, new_events=[event("stale")], state={"v": "stale"})
    assert (refused.value.ticket, refused.value.fence) == (BIG, BIG + 5)
    assert "nothing was overwritten" in str(refused.value)
    with pytest.raises(StaleTicketError):
        await store.load("c", ticket=BIG + 4)
    record = await store.load("c")
    assert record.events == [event("first")]
    assert record.state == {"v": "first"}
    assert (record.ticket, record.fence) == (BIG, BIG + 5)


async def test_a_save_with_a_lower_ticket_than_the_last_save_is_refused(store: TrackerStore) -> None:
    await store.save("c", ticket=BIG + 2, new_events=[event("newer")], state={"v": 2})
    with pytest.raises(StaleTicketError):
        await store.save("c", ticket=BIG + 1, new_events=[event("older")], state={"v": 1})
    assert (await store.load("c")).state == {"v": 2}


async def test_the_same_ticket_may_save_again(store: TrackerStore) -> None:
    await store.load("c", ticket=7)
    await store.save("c", ticket=7, new_events=[event("a")], state={})
    await store.save("c", ticket=7, new_events=[event("b")], state={"k": 1})
    assert [e["text"] for e in (await store.load("c")).events] == ["a", "b"]


async def test_values_that_are_not_json_write_nothing(store: TrackerStore) -> None:
    await store.save("c", ticket=1, new_events=[event("a")], state={"v": 1})
    with pytest.raises(ValueError, match="Out of range float"):
        await store.save("c", ticket=2, new_events=[event("b")], state={"v": float("nan")})
    with pytest.raises(TypeError):
        await store.save("c", ticket=2, new_events=[{"x": object()}], state={})
    record = await store.load("c")
    assert (record.events, record.state, record.ticket) == ([event("a")], {"v": 1}, 1)


async def test_a_state_the_server_encoded_is_saved_as_its_text(store: TrackerStore) -> None:
    # The server proves a state is JSON by encoding it; the built-in stores
    # save that text rather than encode the state again. (The text here
    # differs from the dict on purpose, to show which one was saved.)
    state = EncodedState({"v": 1}, '{"v":1,"from":"text"}')
    assert isinstance(state, dict)  # what any other store sees: a plain dict of the state
    assert state == {"v": 1}
    await store.save("c", ticket=1, new_events=[event("a")], state=state)
    assert (await store.load("c")).state == {"v": 1, "from": "text"}


async def test_loaded_state_is_a_copy(store: TrackerStore) -> None:
    await store.save("c", ticket=1, new_events=[], state={"items": [1]})
    record = await store.load("c")
    record.state["items"].append(2)
    assert (await store.load("c")).state == {"items": [1]}


async def test_tickets_must_be_positive_ints(store: TrackerStore) -> None:
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="ticket"):
            await store.save("c", ticket=bad, new_events=[], state={})


async def test_redis_keys_are_namespaced_and_expire_when_idle(redis_server: RedisProcess) -> None:
    tracker = create_tracker_store({
        "type": "redis", "host": redis_server.host, "port": redis_server.port, "db": 0,
        "key_prefix": "app", "expire_after": 100,
    })
    assert isinstance(tracker, RedisTrackerStore)
    try:
        await tracker.load("a{b}:c", ticket=1)
        await tracker.save("a{b}:c", ticket=1, new_events=[event("x")], state={})
    finally:
        await tracker.aclose()
    keys = sorted(redis_server.command("KEYS", "*"))
    assert keys == ["app:tracker:{a%7Bb%7D%3Ac}", "app:tracker:{a%7Bb%7D%3Ac}:ev"]
    assert all(90_000 < redis_server.command("PTTL", key) <= 100_000 for key in keys)


async def test_an_unreachable_redis_is_reported_with_its_address() -> None:
    from convlock.server.tracker import TrackerStoreUnavailable

    tracker = create_tracker_store({"type": "redis", "host": "127.0.0.1", "port": 1, "socket_timeout": 1})
    try:
        with pytest.raises(TrackerStoreUnavailable, match=r"127\.0\.0\.1:1"):
            await tracker.ping()
        with pytest.raises(TrackerStoreUnavailable):
            await tracker.load("c", ticket=1)
    finally:
        await tracker.aclose()


@pytest.mark.parametrize(("config", "message"), [
    ({"type": "redis", "port": "abc"}, "tracker_store.port"),
    ({"type": "redis", "expire_after": -1}, "tracker_store.expire_after"),
    ({"type": "nosuch"}, "tracker_store.type"),
    ({"type": "nosuch.module.Store"}, "tracker_store.type: cannot import"),
    ({"type": "convlock.memory.InMemoryLockStore"}, "not a subclass"),
    ([1], "expected a mapping"),
])
def test_bad_tracker_store_blocks_name_the_key(config: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_tracker_store(config)


def test_a_custom_tracker_store_is_built_from_its_dotted_path() -> None:
    store = create_tracker_store({"type": "convlock.server.tracker.InMemoryTrackerStore"})
    assert isinstance(store, InMemoryTrackerStore)
    assert isinstance(create_tracker_store(None), InMemoryTrackerStore)


# -- message IDs (exactly-once delivery)


async def test_a_remembered_message_id_returns_its_reply_and_nothing_else(store: TrackerStore) -> None:
    assert (await store.load("c", ticket=1, message_id="m1")).replay is None
    await store.save("c", ticket=1, new_events=[event("a")], state={"n": 1}, message_id="m1", reply='[{"t":"é"}]')
    repeat = await store.load("c", ticket=2, message_id="m1")
    assert repeat.replay == '[{"t":"é"}]'
    other = await store.load("c", ticket=3, message_id="m2")
    assert other.replay is None
    assert other.events == [event("a")]
    # IDs belong to one conversation; the fence still rules a repeat.
    assert (await store.load("d", ticket=4, message_id="m1")).replay is None
    with pytest.raises(StaleTicketError):
        await store.load("c", ticket=2, message_id="m1")


async def test_the_first_reply_of_an_id_is_kept(store: TrackerStore) -> None:
    await store.save("c", ticket=1, new_events=[], state={}, message_id="m", reply='["first"]')
    await store.save("c", ticket=2, new_events=[], state={}, message_id="m", reply='["second"]')
    assert (await store.load("c", ticket=3, message_id="m")).replay == '["first"]'


async def test_remembered_ids_are_bounded_oldest_forgotten_first(request: pytest.FixtureRequest) -> None:
    stores: list[TrackerStore] = [InMemoryTrackerStore(remember_message_ids=3)]
    redis_server: RedisProcess = request.getfixturevalue("redis_server")
    stores.append(create_tracker_store({
        "type": "redis", "url": redis_server.host, "port": redis_server.port, "db": 0, "remember_message_ids": 3,
    }))
    for tracker in stores:
        for i in range(1, 6):
            await tracker.save("c", ticket=i, new_events=[event(f"m{i}")], state={}, message_id=f"m{i}", reply=f"[{i}]")
        replays = [(await tracker.load("c", ticket=10 + i, message_id=f"m{i}")).replay for i in range(1, 6)]
        assert replays == [None, None, "[3]", "[4]", "[5]"], type(tracker).__name__
        await tracker.aclose()
    assert redis_server.command("HLEN", "convlock:tracker:{c}:ids") == 3
    assert redis_server.command("LRANGE", "convlock:tracker:{c}:ido", 0, -1) == ["m3", "m4", "m5"]


async def test_message_id_keys_share_the_slot_and_the_ttl(redis_server: RedisProcess) -> None:
    from redis.crc import key_slot

    tracker = create_tracker_store({
        "type": "redis", "url": redis_server.host, "port": redis_server.port, "db": 0, "expire_after": 100,
    })
    try:
        await tracker.load("a:b", ticket=1, message_id="m")
        await tracker.save("a:b", ticket=1, new_events=[event("x")], state={}, message_id="m", reply="[]")
    finally:
        await tracker.aclose()
    keys = sorted(redis_server.command("KEYS", "*"))
    assert keys == [
        "convlock:tracker:{a%3Ab}", "convlock:tracker:{a%3Ab}:ev", "convlock:tracker:{a%3Ab}:ido",
        "convlock:tracker:{a%3Ab}:ids",
    ]
    assert len({key_slot(key.encode()) for key in keys}) == 1
    assert all(90_000 < redis_server.command("PTTL", key) <= 100_000 for key in keys)


@pytest.mark.parametrize("bad", ["", "x" * 257, "é" * 129])
async def test_message_ids_are_1_to_256_bytes(store: TrackerStore, bad: str) -> None:
    with pytest.raises(ValueError, match="message_id"):
        await store.load("c", ticket=1, message_id=bad)
    with pytest.raises(ValueError, match="message_id"):
        await store.save("c", ticket=1, new_events=[], state={}, message_id=bad, reply="[]")


def test_stores_without_message_ids_are_recognised() -> None:
    from convlock.server.tracker import supports_message_ids

    class OldStore(InMemoryTrackerStore):
        async def load(self, conversation_id: str, *, ticket: int | None = None) -> Any:  # type: ignore[override]
            return await super().load(conversation_id, ticket=ticket)

    assert supports_message_ids(InMemoryTrackerStore())
    assert not supports_message_ids(OldStore())


# -- WAIT for replicas


async def test_a_save_no_replica_confirms_is_not_acknowledged(redis_server: RedisProcess) -> None:
    from convlock.server.tracker import TrackerNotReplicated

    tracker = create_tracker_store({
        "type": "redis", "url": redis_server.host, "port": redis_server.port, "db": 0,
        "min_replicas_acked": 1, "replica_ack_timeout": 0.1,
    })
    try:
        with pytest.raises(TrackerNotReplicated, match="0 of the 1 replicas"):
            await tracker.save("c", ticket=1, new_events=[event("a")], state={}, message_id="m", reply="[1]")
        # The master has it (a failover may drop it): a retry's replay is refused the same way.
        with pytest.raises(TrackerNotReplicated):
            await tracker.load("c", ticket=2, message_id="m")
        with pytest.raises(StaleTicketError):  # a refused ticket wrote nothing, so no WAIT verdict
            await tracker.save("c", ticket=1, new_events=[], state={})
    finally:
        await tracker.aclose()


async def test_sentinel_mode_waits_for_one_replica_by_default(redis_sentinel: SentinelSetup) -> None:
    tracker = create_tracker_store({
        "type": "redis", "deployment_mode": "sentinel", "endpoints": redis_sentinel.endpoints(), "db": 0,
        "key_prefix": "waiting",
    })
    assert isinstance(tracker, RedisTrackerStore)
    assert tracker.min_replicas_acked == 1
    try:
        await tracker.load("c", ticket=1, message_id="m")
        await tracker.save("c", ticket=1, new_events=[event("a")], state={}, message_id="m", reply="[1]")
        assert (await tracker.load("c", ticket=2, message_id="m")).replay == "[1]"
        [replica] = redis_sentinel.replicas
        assert replica.command("HGET", "waiting:tracker:{c}:ids", "m") == "[1]"
    finally:
        await tracker.aclose()


async def test_cluster_saves_wait_on_the_slot_master(redis_cluster: ClusterSetup) -> None:
    from convlock.server.tracker import TrackerNotReplicated

    block = {"type": "redis", "deployment_mode": "cluster", "endpoints": redis_cluster.endpoints(), "key_prefix": "cw"}
    waiting = create_tracker_store({**block, "min_replicas_acked": 1, "replica_ack_timeout": 0.1})
    plain = create_tracker_store(block)
    try:
        for n in range(3):  # conversations on different nodes
            cid = f"conv-{n}"
            with pytest.raises(TrackerNotReplicated):  # the test cluster has no replicas
                await waiting.save(cid, ticket=1, new_events=[event("a")], state={}, message_id="m", reply="[1]")
            assert (await plain.load(cid, ticket=2, message_id="m")).replay == "[1]"
            with pytest.raises(TrackerNotReplicated):
                await waiting.load(cid, ticket=3, message_id="m")
    finally:
        await waiting.aclose()
        await plain.aclose()
