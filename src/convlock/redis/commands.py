"""The lock store's short commands: budgeted, bounded in time, never re-sent.

Why not ``client.execute_command``
----------------------------------
redis-py re-sends a command after a connection error or a timeout when its
client was built with a retrying policy, which is the default for clients
that users build themselves. For a lock script that is wrong: an ``ISSUE``
whose reply timed out may have run, and running it again draws a second
ticket that nobody owns, so the caller queues behind its own ghost for a
whole lease. So for a standard or Sentinel-managed client (one server at a
time) this module takes a connection from the client's pool, sends the
command, reads one reply and gives the connection back, which is what
redis-py does minus the retry loop and its per-call observability hooks.
A Cluster client must follow ``MOVED`` redirections, which only its own
``execute_command`` does; a Cluster client passed in with a retrying policy
is refused by the store instead.

Budget
------
Each call first takes a slot of an ``asyncio.Semaphore`` sized to the
store's command budget (``max_connections`` minus the connections that the
wake-up readers may use), waiting for one at most ``socket_timeout``. A
pool never opens more connections than calls in flight, so the store's
connections stay within ``max_connections`` whatever the number of callers,
and blocking reads (which have their own budget, see
:mod:`convlock.redis.wakeups`) can never starve these short commands.

Time
----
Every call, the wait for a slot included, is bounded by ``timeout`` on the
client's clock (``asyncio.timeout``), whatever socket timeout a client
passed in has. A connection whose reply did not come in time, or whose
caller was cancelled mid-call, is closed rather than reused, since the
late reply would be read by the next caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from .connection import RedisClient
from .scripts import LuaScript

__all__ = ["CommandPath", "retries_on_timeout"]


class CommandPath:
    """Sends one store's short commands; see the module docstring for the promises.

    ``budget`` bounds the calls in flight (and so the connections they use);
    ``timeout`` bounds each call, the wait for a slot included. Errors are
    redis-py's (``RedisError``, ``OSError``) or ``TimeoutError``; the store
    maps them to ``LockStoreUnavailable``.
    """

    __slots__ = ("_client", "_direct", "_pool", "_slots", "budget", "timeout")

    def __init__(self, client: RedisClient, *, budget: int, timeout: float) -> None:
        self._client = client
        self.budget = budget
        self.timeout = timeout
        self._slots = asyncio.Semaphore(budget)
        # A standard or Sentinel-managed client talks to one server through
        # one pool: send on its connections directly (no retry loop).
        self._direct = isinstance(client, aioredis.Redis) and client.connection_pool is not None
        self._pool = client.connection_pool if isinstance(client, aioredis.Redis) else None

    @property
    def in_flight(self) -> int:
        """Calls holding a slot now (for ``statistics()``)."""
        return self.budget - self._slots._value

    async def evalsha(self, script: LuaScript, key: str, *args: Any) -> Any:
        """Run ``script`` with one declared key, loading it first if the server forgot it."""
        return await self.evalsha_keys(script, (key,), args)

    async def evalsha_keys(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run ``script`` with several declared keys (all in one hash slot), as :meth:`evalsha`."""
        async with asyncio.timeout(self.timeout):
            async with self._slots:
                try:
                    return await self._one("EVALSHA", script.sha, len(keys), *keys, *args)
                except NoScriptError:
                    # A restarted or failed-over server forgot our scripts. (As
                    # one word, "SCRIPT LOAD" goes to every node of a cluster.)
                    await self._one("SCRIPT LOAD", script.source)
                    return await self._one("EVALSHA", script.sha, len(keys), *keys, *args)

    async def call(self, *args: Any) -> Any:
        """Run one plain command (PING, DOORBELL's EVALSHA, ...)."""
        async with asyncio.timeout(self.timeout), self._slots:
            return await self._one(*args)

    async def pipeline(self, calls: Sequence[tuple[LuaScript, str, Sequence[Any]]]) -> list[Any]:
        """Run several scripts in one round trip; each reply or error is returned in order.

        A script the server forgot is loaded and the batch sent once more:
        nothing in it ran, since every call in it failed the same way.
        """
        async with asyncio.timeout(self.timeout), self._slots:
            for attempt in range(2):
                replies = await self._batch(
                    [("EVALSHA", script.sha, 1, key, *args) for script, key, args in calls]
                )
                missing = {
                    script.name: script
                    for (script, _, _), reply in zip(calls, replies, strict=True)
                    if isinstance(reply, NoScriptError)
                }
                if attempt == 0 and missing:
                    for script in missing.values():
                        await self._one("SCRIPT LOAD", script.source)
                    continue
                return replies
        raise AssertionError("unreachable")  # pragma: no cover

    async def _one(self, *args: Any) -> Any:
        if not self._direct:
            return await self._client.execute_command(*args)
        pool = self._pool
        assert pool is not None
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_command(*args)
            return await conn.read_response()
        except ResponseError:
            raise  # an error reply: the connection is in step and reusable
        except BaseException:
            # No reply, or one still on its way: never hand this socket on.
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

    async def _batch(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        if not self._direct:
            pipe = self._client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            result: list[Any] = await pipe.execute(raise_on_error=False)
            return result
        pool = self._pool
        assert pool is not None
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(conn.pack_commands(commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as error:
                    replies.append(error)
            return replies
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)


def retries_on_timeout(client: RedisClient) -> bool:
    """Whether a Cluster client passed in would re-send a command after a timeout.

    Only Cluster clients are asked: for the others :class:`CommandPath`
    bypasses redis-py's retry loop.
    """
    if not isinstance(client, RedisCluster):
        return False
    retry = getattr(client, "retry", None)
    return retry is not None and getattr(retry, "_retries", 0) > 0
