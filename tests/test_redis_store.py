"""RedisLockStore against a real redis-server: semantics, failures, keys, command counts."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis

import redis_procs
from convlock import (
    LockError,
    LockLostError,
    LockStoreUnavailable,
    LockTimeoutError,
    RedisSettings,
    create_lock_store,
)
from convlock.redis import RedisLockStore, scripts
from convlock.redis.keys import KeySpace
from redis_procs import RedisProcess
from store_contract import check_granted_at_once

PREFIX = "t"
HOSTILE_IDS = [
    "a:b",
    "a",
    "a}:q",
    "{a}",
    "*",
    "user*",
    "?[x]\\",
    "%41",
    "A",
    "ünïcødé 日本語 🙂",
    "sp ace\ttab\nnl",
    "}{",
]


def _keys(proc: RedisProcess) -> list[str]:
    with proc.client() as client:
        return sorted(str(key) for key in client.scan_iter(count=1000))


@pytest.fixture
async def store(redis_server: RedisProcess) -> AsyncIterator[RedisLockStore]:
    """A store on the shared server; the test fails if it leaves any key behind."""
    lock_store = RedisLockStore(redis_server.url(), key_prefix=PREFIX, lifetime=5, socket_timeout=2)
    yield lock_store
    await lock_store.aclose()
    # Counters kept only until the clock passes them vanish within milliseconds.
    await _until(lambda: _keys(redis_server) == [], timeout=1.0)


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    """Wait for an async or sync predicate to hold; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def _waiting(store: RedisLockStore, cid: str) -> int:
    snapshot = await store.inspect(cid)
    return 0 if snapshot is None else len(snapshot.waiting)


# -- the basics


async def test_lock_grants_and_releases(store: RedisLockStore, redis_server: RedisProcess) -> None:
    async with store.lock("c1") as held:
        assert held.conversation_id == "c1"
        assert held.ticket > 0
        assert not held.lost
        await held.ensure()
        snapshot = await store.inspect("c1")
        assert snapshot is not None
        assert snapshot.serving is not None
        assert snapshot.serving.ticket == held.ticket
        assert 4.0 < snapshot.serving.expires_in <= 5.0
        assert snapshot.waiting == ()
        assert [c async for c in store.conversations()] == ["c1"]
        assert all(k.startswith(f"{PREFIX}:{{") for k in _keys(redis_server))
    assert await store.inspect("c1") is None
    assert [c async for c in store.conversations()] == []


async def test_fifo_order_within_a_process(store: RedisLockStore) -> None:
    order: list[int] = []
    tickets: dict[int, int] = {}
    first = store.lock("fifo")
    await first.__aenter__()

    async def worker(i: int) -> None:
        async with store.lock("fifo") as held:
            tickets[i] = held.ticket
            order.append(i)
            await asyncio.sleep(0.001)

    tasks = []
    for i in range(8):
        tasks.append(asyncio.create_task(worker(i)))
        await _until(lambda n=i + 1: _nwaiting(store, "fifo", n))
    await first.__aexit__(None, None, None)
    await asyncio.gather(*tasks)
    assert order == list(range(8))
    assert [tickets[i] for i in order] == sorted(tickets.values())
    assert first.ticket < min(tickets.values())


async def test_a_hold_tells_whether_it_was_granted_at_once(store: RedisLockStore) -> None:
    await check_granted_at_once(store, "once", lambda: _until(lambda: _nwaiting(store, "once", 1)))


async def test_release_wakes_only_the_next_waiter(store: RedisLockStore) -> None:
    granted: list[int] = []
    release = asyncio.Event()
    holder = store.lock("herd", lifetime=30)
    await holder.__aenter__()

    async def waiter(i: int) -> None:
        async with store.lock("herd", lifetime=30):
            granted.append(i)
            await release.wait()

    tasks = []
    for i in range(3):
        tasks.append(asyncio.create_task(waiter(i)))
        await _until(lambda n=i + 1: _nwaiting(store, "herd", n))
    before = store.statistics()
    await holder.__aexit__(None, None, None)
    await _until(lambda: granted == [0])
    await asyncio.sleep(0.05)
    assert granted == [0]
    after = store.statistics()
    # The holder is in this process: its release reply names the next
    # ticket, which is handed over in-process, with no Redis wake-up at all.
    assert after["local_handoffs"] == before["local_handoffs"] + 1
    assert after["wakeups"] == before["wakeups"]
    assert await _waiting(store, "herd") == 2
    release.set()
    await asyncio.gather(*tasks)
    assert granted == [0, 1, 2]


async def _nwaiting(store: RedisLockStore, cid: str, n: int) -> bool:
    return await _waiting(store, cid) == n


async def test_uncontended_cycle_costs_two_client_commands(
    store: RedisLockStore, redis_server: RedisProcess
) -> None:
    async with store.lock("warm"):  # loads the scripts, opens the connection
        pass
    seen: list[dict[str, Any]] = []
    ready = threading.Event()

    def monitor() -> None:
        with redis_server.client(decode_responses=False) as client, client.monitor() as mon:
            ready.set()
            while True:
                command = mon.next_command()
                if "convlock-monitor-stop" in command["command"]:
                    return
                seen.append(command)

    thread = threading.Thread(target=monitor, daemon=True)
    thread.start()
    ready.wait(5)
    await asyncio.sleep(0.05)  # MONITOR is registered once its reply came back
    before = redis_server.info("commandstats")
    async with store.lock("cycle") as held:
        assert held.ticket > 0
    after = redis_server.info("commandstats")
    redis_server.command("ECHO", "convlock-monitor-stop")
    thread.join(5)

    def calls(stats: dict[str, str], name: str) -> int:
        field = stats.get(f"cmdstat_{name}", "calls=0")
        return int(field.split(",")[0].split("=")[1])

    assert calls(after, "evalsha") - calls(before, "evalsha") == 2
    # The test's own helper connections (INFO, ECHO) come from other ports.
    ports = {c["client_port"] for c in seen if c["client_type"] != "lua" and c["command"].startswith("EVALSHA")}
    assert len(ports) == 1
    from_store = [c["command"].split()[0] for c in seen if c["client_port"] in ports]
    assert from_store == ["EVALSHA", "EVALSHA"]
    # ...and the scripts' own calls are reported as coming from Lua.
    assert any(c["client_type"] == "lua" for c in seen)


# -- leases


async def test_wait_timeout_withdraws_the_ticket(store: RedisLockStore) -> None:
    async with store.lock("wt") as held:
        started = time.monotonic()
        with pytest.raises(LockTimeoutError, match="withdrawn") as info:
            async with store.lock("wt", wait_timeout=0.2):
                pytest.fail("granted while held")
        assert time.monotonic() - started >= 0.2
        assert info.value.conversation_id == "wt"
        snapshot = await store.inspect("wt")
        assert snapshot is not None
        assert snapshot.waiting == ()
        assert snapshot.serving is not None
        assert snapshot.serving.ticket == held.ticket
    assert store.statistics()["wait_timeouts"] == 1


async def test_cancelling_a_waiter_withdraws_its_ticket(store: RedisLockStore) -> None:
    async with store.lock("cx"):
        task = asyncio.create_task(store.lock("cx").__aenter__())
        await _until(lambda: _nwaiting(store, "cx", 1))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _until(lambda: _nwaiting(store, "cx", 0), timeout=2)
        # The queue still works: the next waiter is served after us.
        nxt = asyncio.create_task(_hold_briefly(store, "cx"))
        await _until(lambda: _nwaiting(store, "cx", 1))
    assert await nxt > 0
    assert store.statistics()["cancelled_waits"] == 1


async def _hold_briefly(store: RedisLockStore, cid: str, **kwargs: Any) -> int:
    async with store.lock(cid, **kwargs) as held:
        return held.ticket


async def test_non_renewing_holder_loses_the_lock(store: RedisLockStore) -> None:
    async with store.lock("nr", lifetime=0.3, renew=False) as held:
        waiter = asyncio.create_task(_hold_briefly(store, "nr", lifetime=5))
        await asyncio.sleep(0.45)
        assert held.lost
        with pytest.raises(LockLostError, match="lost"):
            await held.ensure()
        # The waiter was served by its own timer: nobody released.
        ticket = await asyncio.wait_for(waiter, 2)
        assert ticket > held.ticket
    assert store.statistics()["rechecks"] >= 1


async def test_renewing_holder_keeps_the_lock_past_its_lifetime(store: RedisLockStore) -> None:
    # Renewed every 0.2 s: a stall of up to 0.4 s on a busy machine costs nothing.
    async with store.lock("rn", lifetime=0.6) as held:
        with pytest.raises(LockTimeoutError):
            async with store.lock("rn", wait_timeout=1.2):  # twice the lifetime
                pytest.fail("granted while a renewing holder is alive")
        assert not held.lost
        await held.ensure()
        snapshot = await store.inspect("rn")
        assert snapshot is not None
        assert snapshot.serving is not None
        assert snapshot.serving.ticket == held.ticket
    assert store.statistics()["renewals"] >= 3


async def test_dead_waiters_are_skipped(store: RedisLockStore, redis_server: RedisProcess) -> None:
    keys = KeySpace(PREFIX).keys("dead")
    async with store.lock("dead") as held:
        with redis_server.client(decode_responses=False) as raw:
            # A waiter whose process died right after drawing: it never renews.
            dead = raw.eval(scripts.ISSUE.source, 1, keys.state, 200_000)
        assert isinstance(dead, list)  # queued, not granted
        alive = asyncio.create_task(_hold_briefly(store, "dead"))
        await _until(lambda: _nwaiting(store, "dead", 2))
        await asyncio.sleep(0.3)  # the dead ticket's lease ends
    # Released: the dead ticket is skipped and the live one served.
    ticket = await asyncio.wait_for(alive, 2)
    assert ticket > dead[0] > held.ticket


async def test_force_release_revokes_the_holder(store: RedisLockStore) -> None:
    async with store.lock("fr") as held:
        waiter = asyncio.create_task(_hold_briefly(store, "fr"))
        await _until(lambda: _nwaiting(store, "fr", 1))
        assert await store.force_release("fr") == held.ticket
        assert held.lost
        with pytest.raises(LockLostError):
            await held.ensure()
        assert await asyncio.wait_for(waiter, 2) > held.ticket
    assert await store.force_release("fr") is None


# -- fencing and keys


async def test_tickets_increase_across_idle_deletion(store: RedisLockStore, redis_server: RedisProcess) -> None:
    tickets = []
    for _ in range(20):
        async with store.lock("fence") as held:
            tickets.append(held.ticket)
        assert await store.inspect("fence") is None
    assert tickets == sorted(set(tickets))


async def test_counter_is_kept_until_the_clock_passes_it(
    store: RedisLockStore, redis_server: RedisProcess
) -> None:
    keys = KeySpace(PREFIX).keys("ahead")
    seconds, micros = redis_server.command("TIME")
    ahead = int(seconds) * 1_000_000 + int(micros) + 300_000  # 0.3 s ahead of the clock
    redis_server.command("HSET", keys.state, "n", ahead)
    async with store.lock("ahead") as held:
        assert held.ticket == ahead + 1
    # Idle, but the clock has not passed the ticket: the counter alone stays,
    # with a TTL ending just after the clock passes it.
    assert _keys(redis_server) == [keys.state]
    assert redis_server.command("HGETALL", keys.state) == {"n": str(ahead + 1)}
    assert 0 < int(redis_server.command("PTTL", keys.state)) <= 302
    async with store.lock("ahead") as again:
        assert again.ticket == ahead + 2
    await asyncio.sleep(0.35)
    assert _keys(redis_server) == []
    async with store.lock("ahead") as later:
        assert later.ticket > ahead + 2


async def test_every_key_has_a_ttl(store: RedisLockStore, redis_server: RedisProcess) -> None:
    async with store.lock("ttl", lifetime=2):
        waiter = asyncio.create_task(_hold_briefly(store, "ttl"))
        await _until(lambda: _nwaiting(store, "ttl", 1))
        for key in _keys(redis_server):
            assert 0 < int(redis_server.command("PTTL", key)) <= 5000 + scripts.KEY_TTL_MARGIN_MS, key
    await waiter


async def test_hostile_ids_do_not_collide(store: RedisLockStore, redis_server: RedisProcess) -> None:
    holds = [store.lock(cid) for cid in HOSTILE_IDS]
    for hold in holds:
        await asyncio.wait_for(hold.__aenter__(), 2)  # none blocks another
    try:
        assert sorted([c async for c in store.conversations()]) == sorted(HOSTILE_IDS)
        for hold in holds:
            snapshot = await store.inspect(hold.conversation_id)
            assert snapshot is not None
            assert snapshot.serving is not None
            assert snapshot.serving.ticket == hold.ticket
        space = KeySpace(PREFIX)
        for key in _keys(redis_server):
            assert key.startswith(f"{PREFIX}:{{")
        slots = {redis.crc.key_slot(space.keys(c).queue.encode()) for c in HOSTILE_IDS}
        assert len(slots) > 1  # distinct IDs spread over slots
    finally:
        for hold in holds:
            await hold.__aexit__(None, None, None)
    assert _keys(redis_server) == []


async def test_key_prefix_namespaces(redis_server: RedisProcess, store: RedisLockStore) -> None:
    other = RedisLockStore(redis_server.url(), key_prefix="other", socket_timeout=2)
    try:
        async with store.lock("shared"), other.lock("shared"):  # different prefixes never block
            prefixes = {key.split(":", 1)[0] for key in _keys(redis_server)}
            assert prefixes == {PREFIX, "other"}
            assert [c async for c in other.conversations()] == ["shared"]
    finally:
        await other.aclose()


async def test_bad_arguments_raise_value_error(store: RedisLockStore) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        store.lock("")
    with pytest.raises(ValueError, match="lifetime"):
        store.lock("x", lifetime=-1)
    with pytest.raises(ValueError, match="wait_timeout"):
        store.lock("x", wait_timeout=float("nan"))
    with pytest.raises(ValueError, match="non-empty"):
        await store.inspect("")
    with pytest.raises(TypeError, match="RedisSettings"):
        RedisLockStore(42)  # type: ignore[arg-type]


async def test_a_lock_context_is_entered_once(store: RedisLockStore) -> None:
    hold = store.lock("once")
    async with hold:
        pass
    with pytest.raises(RuntimeError, match="only once"):
        await hold.__aenter__()


# -- configuration and failures


async def test_factory_builds_a_redis_store(redis_server: RedisProcess) -> None:
    lock_store = create_lock_store(
        {
            "type": "redis",
            "url": redis_server.host,
            "port": str(redis_server.port),
            "db": "0",
            "key_prefix": "fact",
            "lifetime": "7",
            "socket_timeout": "2",
        }
    )
    assert isinstance(lock_store, RedisLockStore)
    try:
        assert lock_store.lifetime == 7.0
        assert lock_store.key_prefix == "fact"
        await lock_store.ping()
        async with lock_store.lock("f") as held:
            assert held.ticket > 0
            assert _keys(redis_server)[0].startswith("fact:{f}")
        assert lock_store.statistics()["target"] == f"Redis at {redis_server.host}:{redis_server.port} (db 0)"
    finally:
        await lock_store.aclose()
    assert _keys(redis_server) == []


async def test_closed_store_refuses_locks(redis_server: RedisProcess) -> None:
    lock_store = RedisLockStore(redis_server.url(), socket_timeout=2)
    await lock_store.aclose()
    with pytest.raises(LockError, match="closed"):
        async with lock_store.lock("x"):
            pass


async def test_unreachable_redis_fails_fast_naming_the_host() -> None:
    port = redis_procs.free_port()  # nobody listens there
    settings = RedisSettings(url="127.0.0.1", port=port, socket_timeout=0.5)
    lock_store = RedisLockStore(settings)
    try:
        started = time.monotonic()
        with pytest.raises(LockStoreUnavailable, match=f"127.0.0.1:{port}"):
            async with lock_store.lock("x"):
                pass
        with pytest.raises(LockStoreUnavailable, match=f"127.0.0.1:{port}"):
            await lock_store.ping()
        assert time.monotonic() - started < 5
    finally:
        await lock_store.aclose()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never answers, like a hung Redis."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


async def test_silent_redis_times_out_within_socket_timeout(silent_server: int) -> None:
    lock_store = RedisLockStore(RedisSettings(url="127.0.0.1", port=silent_server, socket_timeout=0.3))
    try:
        started = time.monotonic()
        with pytest.raises(LockStoreUnavailable, match=f"127.0.0.1:{silent_server}.*socket_timeout=0.3"):
            async with lock_store.lock("x"):
                pass
        assert time.monotonic() - started < 0.3 + 0.5  # bounded by socket_timeout, never a hang
    finally:
        await lock_store.aclose()


async def test_store_recovers_after_a_redis_restart(fresh_redis: RedisProcess) -> None:
    lock_store = RedisLockStore(fresh_redis.url(), socket_timeout=1)
    try:
        async with lock_store.lock("r") as held:
            first = held.ticket
        fresh_redis.kill()
        with pytest.raises(LockStoreUnavailable, match=str(fresh_redis.port)):
            async with lock_store.lock("r"):
                pass
        fresh_redis.start()
        # The same store, without restarting anything: the pool reconnects
        # and the scripts are loaded again.
        async with lock_store.lock("r") as held:
            assert held.ticket > first
        await lock_store.ping()
        assert lock_store.statistics()["unavailable_errors"] >= 1
    finally:
        await lock_store.aclose()
    assert _keys(fresh_redis) == []


async def test_holder_sees_lost_when_redis_goes_away(fresh_redis: RedisProcess) -> None:
    lock_store = RedisLockStore(fresh_redis.url(), socket_timeout=0.5)
    try:
        async with lock_store.lock("gone", lifetime=0.6) as held:
            fresh_redis.kill()
            await _until(lambda: held.lost, timeout=3)
            with pytest.raises(LockLostError):
                await held.ensure()
        assert lock_store.statistics()["renewal_errors"] >= 1
    finally:
        await lock_store.aclose()


# -- races found in review


def _blocked_clients(proc: RedisProcess) -> int:
    return int(proc.info("clients")["blocked_clients"])


async def test_lost_counts_from_a_grant_that_the_waiters_check_finds_late(
    store: RedisLockStore, redis_server: RedisProcess
) -> None:
    """A grant pushed while the waiter is between a timed-out BLPOP and its check.

    The waiter's event loop stalls (as in a GC pause) after its BLPOP timed out
    on the server; the holder releases during the stall, which grants the
    waiter and starts its lease. The check that follows finds the grant, but
    the lease began earlier: ``held.lost`` must turn true when the server's
    lease ends, not a stall later.
    """
    keys = KeySpace(PREFIX).keys("late")
    with redis_server.client(decode_responses=False) as raw:
        holder = raw.eval(scripts.ISSUE.source, 1, keys.state, 10_000_000)  # 10 s, never renewed
    assert isinstance(holder, int)
    hold = store.lock("late", lifetime=0.9, renew=False)  # waits in BLPOPs of lifetime/3
    task = asyncio.create_task(hold.__aenter__())
    await _until(lambda: _blocked_clients(redis_server) == 1)
    released = threading.Event()

    def release_once_the_blpop_timed_out() -> None:
        deadline = time.monotonic() + 5
        while _blocked_clients(redis_server) and time.monotonic() < deadline:
            time.sleep(0.005)
        with redis_server.client(decode_responses=False) as raw:
            raw.eval(scripts.RELEASE.source, 1, keys.state, holder)
        released.set()

    thread = threading.Thread(target=release_once_the_blpop_timed_out)
    thread.start()
    # Stall the event loop: the BLPOP's empty reply stays unread meanwhile.
    assert released.wait(5)
    time.sleep(0.3)  # noqa: ASYNC251  (the stall is the point)
    thread.join()
    await asyncio.wait_for(task, 5)
    try:
        assert store.statistics()["wakeups"] == 0  # the check found the grant
        snapshot = await store.inspect("late")
        assert snapshot is not None
        assert snapshot.serving is not None
        assert snapshot.serving.ticket == hold.ticket
        assert not hold.lost
        await asyncio.sleep(snapshot.serving.expires_in + 0.02)
        # The server's lease has ended: the local view must agree.
        assert hold.lost
        with pytest.raises(LockLostError):
            await hold.ensure()
    finally:
        await hold.__aexit__(None, None, None)


@pytest.mark.parametrize("contended", [False, True], ids=["granted", "queued"])
async def test_cancelling_during_the_draw_withdraws_the_ticket(
    store: RedisLockStore, redis_server: RedisProcess, contended: bool
) -> None:
    """A task cancelled after its draw ran on the server but before the reply was read.

    The ticket exists in Redis although the task never learnt its number; it
    must still be withdrawn, or it blocks the conversation for a whole lease.
    """
    keys = KeySpace(PREFIX).keys("draw")
    async with store.lock("warm"):  # an open connection and loaded scripts
        pass
    holder = store.lock("draw")
    if contended:
        await holder.__aenter__()
    expected = 2 if contended else 1  # tickets in the conversation once the draw ran

    def drawn() -> int:
        state = redis_server.command("HGETALL", keys.state)
        return ("h" in state) + int(state.get("w", 0))

    # Hold every command on the server for a moment, so that the task sends
    # its draw and sits waiting for the reply...
    redis_server.command("CLIENT", "PAUSE", 500)
    task = asyncio.create_task(store.lock("draw").__aenter__())
    await asyncio.sleep(0.1)
    # ...then, without yielding to the event loop (the reply stays unread),
    # wait until the pause ends and the server has run the draw.
    deadline = time.monotonic() + 5
    while drawn() < expected and time.monotonic() < deadline:
        time.sleep(0.002)  # noqa: ASYNC251
    assert drawn() == expected
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    if contended:
        await holder.__aexit__(None, None, None)
    # The orphan would hold or block "draw" for its 5 s lease.
    async with store.lock("draw", wait_timeout=1.0) as held:
        assert held.ticket > 0
    await _until(lambda: _keys(redis_server) == [], timeout=1.0)


async def test_connections_the_server_closed_while_idle_are_replaced(
    store: RedisLockStore, redis_server: RedisProcess
) -> None:
    """Pooled connections that Redis closed (a restart, its idle ``timeout``) cost no failed call."""
    holds = [store.lock(f"idle{i}") for i in range(3)]
    for hold in holds:  # three connections at once in the pool
        await hold.__aenter__()
    for hold in holds:
        await hold.__aexit__(None, None, None)
    redis_server.command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    await asyncio.sleep(0.1)  # the event loop sees the connections close
    for i in range(4):
        async with store.lock(f"idle{i}") as held:
            assert held.ticket > 0
    assert store.statistics()["unavailable_errors"] == 0
