"""The lock store's command path against a real redis-server: pipelining, errors, cancellation, time bounds."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis._parsers import _AsyncRESP3Parser
from redis.exceptions import NoScriptError, ResponseError

from convlock.redis.commands import CommandPath
from redis_procs import RedisProcess


@pytest.fixture
async def client(redis_server: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    connection = aioredis.Redis(**redis_server.client_kwargs(), db=5, max_connections=40)
    await connection.flushdb()
    yield connection
    await connection.flushdb()
    await connection.aclose()


async def test_concurrent_calls_share_one_connection_and_each_gets_its_own_reply(
    client: aioredis.Redis, redis_server: RedisProcess
) -> None:
    path = CommandPath(client, budget=32, timeout=5)
    before = int(redis_server.command("INFO", "stats")["total_connections_received"])
    # A wrong-type error for one caller must fail that caller only.
    await client.set("not-a-list", "x")
    calls = [path.call("INCRBY", f"k{n % 10}", n) for n in range(300)]
    calls.insert(150, path.call("LPUSH", "not-a-list", "y"))
    replies = await asyncio.gather(*calls, return_exceptions=True)
    # The path took the pooled connection SET gave back: none, or one if the pool had to open one.
    opened = int(redis_server.command("INFO", "stats")["total_connections_received"]) - before
    assert opened <= 1, f"{opened} connections for 301 concurrent calls: they were not pipelined"
    assert isinstance(replies.pop(150), ResponseError)
    totals = {f"k{m}": sum(n for n in range(300) if n % 10 == m) for m in range(10)}
    assert {key: int(await client.get(key) or 0) for key in totals} == totals
    # Each reply is the caller's own: INCRBY by n returns a running total that includes n.
    for n, reply in enumerate(replies):
        assert isinstance(reply, int)
        assert reply >= n
    assert path.in_flight == 0
    await path.aclose()


async def test_a_cancelled_caller_leaves_the_connection_in_step(client: aioredis.Redis) -> None:
    path = CommandPath(client, budget=8, timeout=5)
    first = asyncio.create_task(path.call("INCR", "ran"))
    await asyncio.sleep(0)
    # Its command is written at once: cancelled while it waits, it still runs,
    # and its reply must not reach the next caller.
    doomed = asyncio.create_task(path.call("ECHO", "doomed"))
    kept = asyncio.create_task(path.call("ECHO", "kept"))
    await asyncio.sleep(0)
    doomed.cancel()
    assert await first == 1
    assert await kept == b"kept"
    # Its caller awaits only the reply's future (the lane writes from a loop
    # callback, never inside the caller), so the cancellation is delivered
    # as one, and its reply is dropped rather than handed on.
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert await asyncio.gather(*(path.call("ECHO", f"m{n}") for n in range(20))) == [
        f"m{n}".encode() for n in range(20)
    ]
    await path.aclose()


async def test_a_closed_connection_fails_its_calls_and_the_next_call_reconnects(
    client: aioredis.Redis,
) -> None:
    path = CommandPath(client, budget=8, timeout=5)
    assert await path.call("PING")
    # The server drops our connection (as at a restart or a failover).
    assert await client.client_kill_filter(_type="normal", skipme=True) >= 1
    outcome = await asyncio.gather(path.call("ECHO", "lost"), return_exceptions=True)
    # Either the call failed with the connection, or (if the kill landed
    # first and the lane saw it) it went out on a new connection: never a
    # wrong reply, never a hang.
    assert outcome[0] == b"lost" or isinstance(outcome[0], Exception), outcome
    assert await path.call("ECHO", "again") == b"again"
    await path.aclose()


async def test_calls_to_a_hung_server_fail_in_time_and_the_path_recovers(
    fresh_redis: RedisProcess,
) -> None:
    connection = aioredis.Redis(**fresh_redis.client_kwargs(), max_connections=20)
    path = CommandPath(connection, budget=16, timeout=0.5)
    try:
        assert await path.call("PING")
        os.kill(fresh_redis.pid, signal.SIGSTOP)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            results = await asyncio.gather(*(path.call("INCR", "n") for _ in range(10)), return_exceptions=True)
            elapsed = loop.time() - started
        finally:
            os.kill(fresh_redis.pid, signal.SIGCONT)
        assert all(isinstance(result, TimeoutError) for result in results), results
        assert elapsed < 1.5
        # The connection that timed out was closed, not reused: later replies are in step.
        assert await asyncio.gather(*(path.call("ECHO", f"m{n}") for n in range(20))) == [
            f"m{n}".encode() for n in range(20)
        ]
    finally:
        await connection.aclose()


async def test_a_connection_marked_for_reconnect_takes_no_new_calls(client: aioredis.Redis) -> None:
    """What a Sentinel pool does to its connections when the master changes."""
    path = CommandPath(client, budget=8, timeout=5)
    first_id = await path.call("CLIENT", "ID")
    lane = path._lane
    assert lane is not None
    lane._connection.mark_for_reconnect()  # type: ignore[no-untyped-call]
    assert await path.call("CLIENT", "ID") != first_id
    assert lane.closed, "the old lane went back to its pool once drained"
    await path.aclose()


async def test_the_lane_writes_directly_with_this_redis_py(client: aioredis.Redis) -> None:
    """The fast write path depends on redis-py keeping a StreamWriter per connection: fail if it stops."""
    path = CommandPath(client, budget=8, timeout=5)
    assert await path.call("PING")
    assert path._lane is not None
    assert path._lane.writes_directly
    await path.aclose()


async def test_the_lane_reads_in_the_transports_callback_with_this_redis_py(client: aioredis.Redis) -> None:
    """Reading in data_received depends on redis-py's hiredis reader and StreamWriter: fail if they go."""
    path = CommandPath(client, budget=8, timeout=5)
    assert await path.call("PING")
    assert path._lane is not None
    assert path._lane.reads_in_callbacks
    # A batch whose replies arrive together, an unknown script's error among them.
    replies = await asyncio.gather(
        *(path.call("ECHO", f"r{n}") for n in range(50)), path.call("EVALSHA", "0" * 40, 0),
        return_exceptions=True,
    )
    assert replies[:50] == [f"r{n}".encode() if isinstance(replies[0], bytes) else f"r{n}" for n in range(50)]
    assert isinstance(replies[50], NoScriptError)
    await path.aclose()


async def test_push_messages_on_the_lane_reach_no_caller(client: aioredis.Redis) -> None:
    """RESP3 pushes (here: client-side caching invalidations) are not replies: callers stay in step."""
    path = CommandPath(client, budget=8, timeout=5)
    assert await path.call("CLIENT", "TRACKING", "ON") in (b"OK", "OK")
    other = aioredis.Redis(connection_pool=client.connection_pool)
    for round_ in range(5):
        await path.call("GET", "tracked")  # tracked again after each invalidation
        # The write makes Redis push an invalidation on the lane's connection,
        # between or among the replies of the calls below.
        writes = [other.set("tracked", round_)]
        echoes = [path.call("ECHO", f"{round_}-{n}") for n in range(40)]
        replies = await asyncio.gather(*echoes, *writes)
        texts = [r.decode() if isinstance(r, bytes) else r for r in replies[:40]]
        assert texts == [f"{round_}-{n}" for n in range(40)]
    assert path._lane is not None
    assert not path._lane.closed
    await path.aclose()


async def test_without_hiredis_parsing_a_reader_task_keeps_the_lane_in_step(redis_server: RedisProcess) -> None:
    """redis-py's pure-Python parser has no hiredis reader to feed: the lane reads through read_response."""
    pool = aioredis.ConnectionPool(**redis_server.client_kwargs(), db=5, parser_class=_AsyncRESP3Parser)
    client = aioredis.Redis(connection_pool=pool)
    path = CommandPath(client, budget=8, timeout=5)
    try:
        assert await path.call("PING")
        assert path._lane is not None
        assert not path._lane.reads_in_callbacks
        replies = await asyncio.gather(
            *(path.call("ECHO", f"r{n}") for n in range(50)), path.call("EVALSHA", "0" * 40, 0),
            return_exceptions=True,
        )
        assert replies[:50] == [f"r{n}".encode() for n in range(50)]
        assert isinstance(replies[50], NoScriptError)
    finally:
        await path.aclose()
        await client.aclose()
