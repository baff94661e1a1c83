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

Batching
--------
A call made while another is on the wire does not take a connection of its
own: it joins a batch that leaves at the end of the current event-loop
iteration, written in one system call on one connection, and each caller
gets its own reply (or error reply) in order. A call made while nothing is
in flight goes out at once, so an uncontended lock pays nothing for this.
redis-py has no such automatic pipelining, and on a busy server the write
system calls were the largest single cost of a message on Redis (profiled
with py-spy: 13% of the server's time); batching raised ``convlock run``'s
messages/s on Redis by about a third here. Commands of one caller stay in
order (a caller waits for each reply before its next command), and
commands of different callers were never ordered among themselves. A caller
cancelled before its batch leaves is dropped from it: its command never
runs.

Time
----
Every call, the wait for a slot included, is bounded by ``timeout`` on the
client's clock (``asyncio.timeout``), whatever socket timeout a client
passed in has, and so is every batch as a whole. A connection whose reply
did not come in time, or whose caller was cancelled mid-call, is closed
rather than reused, since the late reply would be read by the next caller.
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

    __slots__ = (
        "_batches", "_client", "_direct", "_pool", "_queue", "_sending", "_slots", "budget", "timeout"
    )

    def __init__(self, client: RedisClient, *, budget: int, timeout: float) -> None:
        self._client = client
        self.budget = budget
        self.timeout = timeout
        self._slots = asyncio.Semaphore(budget)
        # A standard or Sentinel-managed client talks to one server through
        # one pool: send on its connections directly (no retry loop).
        self._direct = isinstance(client, aioredis.Redis) and client.connection_pool is not None
        self._pool = client.connection_pool if isinstance(client, aioredis.Redis) else None
        self._sending = 0
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._batches: set[asyncio.Task[None]] = set()

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
        if self._sending:
            # Others are on the wire: join the batch that leaves at the end
            # of this loop iteration (see "Batching" in the module docstring).
            loop = asyncio.get_running_loop()
            future: asyncio.Future[Any] = loop.create_future()
            if not self._queue:
                loop.call_soon(self._flush)
            self._queue.append((args, future))
            return await future
        self._sending += 1
        try:
            return await self._send_one(args)
        finally:
            self._sending -= 1

    def _flush(self) -> None:
        # A caller cancelled before its batch left is dropped: its command never
        # runs, which its store's clean-up (withdraw by draw ID) copes with.
        batch = [(args, future) for args, future in self._queue if not future.done()]
        self._queue = []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send_batch(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _send_batch(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        """Send ``batch`` in one write on one connection; give each caller its own reply or error.

        Runs in a task of its own, so a caller's cancellation or timeout
        never leaves a reply unread on the connection; the batch as a whole
        is bounded by ``timeout`` and fails every caller still waiting.
        """
        self._sending += 1
        try:
            async with asyncio.timeout(self.timeout):
                replies = await self._batch([args for args, _ in batch])
            for (_, future), reply in zip(batch, replies, strict=True):
                if future.done():
                    continue
                if isinstance(reply, ResponseError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except Exception as error:
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise
        finally:
            self._sending -= 1

    async def _send_one(self, args: tuple[Any, ...]) -> Any:
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
