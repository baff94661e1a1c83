"""The lock store's short commands: pipelined on one connection, bounded in time, never re-sent.

Why not ``client.execute_command``
----------------------------------
redis-py re-sends a command after a connection error or a timeout when its
client was built with a retrying policy, which is the default for clients
that users build themselves. For a lock script that is wrong: an ``ISSUE``
whose reply timed out may have run, and running it again draws a second
ticket that nobody owns, so the caller queues behind its own ghost for a
whole lease. So for a standard or Sentinel-managed client (one server at a
time) this module sends on a connection of the client's pool itself, with
no retry loop. A Cluster client must follow ``MOVED`` redirections, which
only its own ``execute_command`` does; a Cluster client passed in with a
retrying policy is refused by the store instead.

Pipelining (one lane)
---------------------
A standard or Sentinel client's calls all travel on one connection, the
*lane* (:class:`_Lane`), taken from the client's pool and kept: each call
queues its command, the commands queued in one event-loop iteration leave
together in one write at the iteration's end, and the replies are read in
order and handed each to its caller. Redis answers
the commands of one connection in the order it received them, so the n-th
reply is the n-th caller's, error replies included. Many messages in flight
then cost one socket and one read per burst of replies, instead of a pool
connection, a pool lock, a write and a read each. The figures that chose
this (``convlock run`` on Redis, 16 conversations, py-spy): redis-py's
per-call machinery (pool get and release, Python command packing, per-read
timeouts) was about a quarter of the server's time; see the commit that
introduced the lane for before and after. Commands are packed by hiredis,
redis-py's C companion, where it is installed.

One connection is enough: Redis runs commands one at a time whatever the
number of connections, and the replies are small. Commands of one caller
stay in order (a caller waits for each reply before its next command);
commands of different callers were never ordered among themselves.

Reading in the transport's callback
-----------------------------------
Where the connection parses with hiredis (redis-py does when hiredis is
installed, as it is by default), the lane takes the connection's socket
over once it is connected: it sets its own protocol
(:class:`_Replies`) on the connection's transport (asyncio's public
``set_protocol``), whose ``data_received`` feeds the bytes to the
connection's own hiredis reader and resolves each waiting call's future right
there. redis-py's way reads through a reader task: a ``StreamReader``, three
coroutine layers and a task step per burst of replies, then a second step
for the caller. Measured with callgrind (instructions of ``convlock run`` per
message, lock and tracker on one Redis, one message at a time): 745,756 ->
676,401 (-9.3%); with 16 callers at once the lane's CPU per call fell from
11.6 to 9.6 us, and from 62 to 43 us for a single caller. The connection is
the lane's alone from then on: when the lane ends it is disconnected, never
handed back to the pool for reuse. A parser without hiredis leaves the
lane a reader task that reads through redis-py's ``read_response``.

Cancellation: a caller cancelled after its command was written no longer
waits, but its command runs, and its reply is read and dropped, so the lane
stays in step. (The store withdraws a draw whose reply it never saw by its
draw ID.)

Time
----
Every call is bounded by ``timeout`` on the client's clock, whatever socket
timeout a client passed in has. One timer per lane watches the oldest call
waiting for its reply: if that one is ``timeout`` old, the lane is closed,
every call still waiting on it fails with ``TimeoutError``, and the next
call opens a new lane (a new connection). A connection error fails the
lane's waiting calls the same way. No call is sent twice.

Failover: a lane whose connection its Sentinel pool marked for reconnect
(the master changed) takes no new calls; it finishes the ones in flight and
goes back to the pool, which closes it.

For a Cluster client each call takes a slot of an ``asyncio.Semaphore``
sized to the store's command budget, which bounds its connections, and is
bounded by ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from .connection import RedisClient
from .scripts import LuaScript

# What redis-py's hiredis reader returns while a reply is still incomplete.
_NOT_ENOUGH_DATA: Any
try:
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
except ImportError:  # pragma: no cover - a redis-py without it: the drain stops at False
    _NOT_ENOUGH_DATA = False

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:  # hiredis packs a command in C, about ten times faster than redis-py's Python
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is a dependency; kept for stripped installs
    _hiredis_pack = None

__all__ = ["CommandPath", "retries_on_timeout"]


def _packer(connection: AbstractConnection) -> Callable[[tuple[Any, ...]], Any]:
    """hiredis's packer when it encodes as the connection would (UTF-8), else the connection's own."""
    encoder = connection.encoder
    utf8 = encoder.encoding.lower().replace("-", "") == "utf8" and encoder.encoding_errors == "strict"
    if _hiredis_pack is None or not utf8:
        return lambda args: connection.pack_command(*args)
    pack = _hiredis_pack

    def packed(args: tuple[Any, ...]) -> bytes:
        head = args[0]
        if " " in head:  # "SCRIPT LOAD": Redis wants the words as separate arguments, as redis-py sends them
            args = (*head.split(), *args[1:])
        return pack(args)

    return packed


class _Lane:
    """One pooled connection carrying many calls at once; see "Pipelining" in the module docstring.

    A lane is open until its first failure (every waiting call then fails
    with that error) or until it is retired (it drains, then goes back to
    its pool). It never carries a call after either.
    """

    __slots__ = ("_connection", "_loop", "_out", "_owned", "_pack", "_pending", "_pool", "_reader", "_tasks",
                 "_timer", "_writing", "closed", "retired", "timeout")

    def __init__(self, pool: ConnectionPool, connection: AbstractConnection, timeout: float) -> None:
        self._pool = pool
        self._connection = connection
        self._pack = _packer(connection)
        self.timeout = timeout
        # (deadline, future) per written command, oldest first: replies come in this order.
        self._pending: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        # Packed commands not yet written, and whether a caller will write them.
        self._out: list[bytes] = []
        self._writing = False
        self.closed = False
        self.retired = False
        self._tasks: set[asyncio.Task[None]] = set()
        # A lane lives on the loop that opened it (its connection's streams do too).
        self._loop = asyncio.get_running_loop()
        # Whether the lane reads in the transport's callback (the socket is then its own).
        self._owned = _Replies.take_over(self, connection)
        self._reader = None if self._owned else self._loop.create_task(self._read())

    @property
    def in_flight(self) -> int:
        """Calls written and not yet answered."""
        return len(self._pending)

    def usable(self) -> bool:
        """Whether a new call may be written here."""
        if self.closed or self.retired:
            return False
        connection = self._connection
        if connection.should_reconnect() or not connection.is_connected:  # type: ignore[no-untyped-call]
            self.retire()
            return False
        return True

    def queue(self, commands: Sequence[tuple[Any, ...]]) -> list[asyncio.Future[Any]]:
        """Queue ``commands`` for this loop iteration's write; return one future per command.

        Each future is resolved with its command's reply (or error reply),
        or fails with the lane. The caller must then call :meth:`flush`.
        """
        loop = self._loop
        pack, out, pending = self._pack, self._out, self._pending
        deadline = loop.time() + self.timeout
        futures = []
        # The bytes and the futures are queued together, so the n-th reply
        # read is the n-th future's.
        for args in commands:
            future = loop.create_future()
            out.append(_join(pack(args)))
            pending.append((deadline, future))
            futures.append(future)
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._check)
        return futures

    def flush(self) -> None:
        """Have what this loop iteration queued written at the iteration's end, in one write.

        The first caller of an iteration schedules the write; the callers
        after it in the same iteration add to it.
        """
        if self._writing:
            return
        self._writing = True
        self._loop.call_soon(self._write)

    def _write(self) -> None:
        self._writing = False
        data, self._out = b"".join(self._out), []
        if not data or self.closed:
            return
        connection = self._connection
        if not connection.is_connected:
            # Writing through redis-py now would reconnect first, and the new
            # socket's replies would pair with the old one's callers.
            self._fail(RedisConnectionError("the connection closed before the commands were written"))
            return
        # The connection's StreamWriter, written synchronously from this
        # callback: redis-py's own write (send_packed_command) is a coroutine
        # and needs a task step per write, which cost the server about a
        # sixth of its CPU per message on Redis here (A/B with drive.py).
        # No drain: the lane's timer bounds how long unanswered bytes pile up.
        writer = getattr(connection, "_writer", None)
        if isinstance(writer, asyncio.StreamWriter):
            try:
                writer.write(data)
            except Exception as error:
                self._fail(error)
            return
        # A redis-py whose connections keep their writer elsewhere: its public write, in a task.
        self._spawn(self._write_async(connection, data))

    @property
    def reads_in_callbacks(self) -> bool:
        """Whether this lane reads its replies in the transport's callback (the fast path)."""
        return self._owned

    @property
    def writes_directly(self) -> bool:
        """Whether this lane writes through the connection's StreamWriter (the fast path)."""
        return isinstance(getattr(self._connection, "_writer", None), asyncio.StreamWriter)

    async def _write_async(self, connection: AbstractConnection, data: bytes) -> None:
        try:
            await connection.send_packed_command(data, check_health=False)
        except BaseException as error:
            self._fail(error)

    async def _read(self) -> None:
        """The reader task, where the lane cannot read in the transport's callback (module docstring)."""
        connection = self._connection
        try:
            while not self.closed:
                try:
                    # No per-read timeout: the lane's timer bounds the calls.
                    reply: Any = await connection.read_response(timeout=math.inf, disconnect_on_error=False)
                except ResponseError as error:
                    reply = error  # an error reply: the caller's alone, the lane is in step
                self._answer(reply)
        except asyncio.CancelledError:
            self._fail(RedisConnectionError("the connection was closed"))
            raise
        except BaseException as error:
            self._fail(error)

    def _answer(self, reply: Any) -> None:
        """Give the oldest waiting call its reply (an error reply is that call's error alone).

        A retired lane closes once its last call is answered.
        """
        pending = self._pending
        if not pending:
            raise RedisConnectionError("a reply came that no call on this connection asked for")
        _, future = pending.popleft()
        if not future.done():  # its caller may have been cancelled
            if isinstance(reply, ResponseError):
                future.set_exception(reply)
            else:
                future.set_result(reply)
        if self.retired and not pending:
            self._close()

    def _check(self) -> None:
        # Fires at the deadline of the oldest call known when it was set; a
        # call answered since then leaves the next one to check.
        self._timer = None
        if self.closed or not self._pending:
            return
        loop = asyncio.get_running_loop()
        deadline = self._pending[0][0]
        if deadline <= loop.time():
            self._fail(TimeoutError(f"no reply within {self.timeout:g}s"))
        else:
            self._timer = loop.call_at(deadline, self._check)

    def retire(self) -> None:
        """Take no new calls; go back to the pool once the calls in flight are answered."""
        self.retired = True
        if not self._pending:
            self._close()

    def _fail(self, error: BaseException) -> None:
        """Fail every waiting call with ``error`` and close the connection."""
        if self.closed:
            return
        if isinstance(error, asyncio.CancelledError):
            error = RedisConnectionError("the connection was closed")
        while self._pending:
            _, future = self._pending.popleft()
            if not future.done():
                future.set_exception(error)
        self._close(discard=True)

    def _close(self, *, discard: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        # A socket the lane took over has no reader of redis-py's any more: never reused.
        self._spawn(self._give_back(discard or self._owned))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        # Kept until done (the loop holds tasks only weakly); aclose() waits for them.
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _give_back(self, discard: bool) -> None:
        with contextlib.suppress(Exception):
            if discard:  # replies may still be on their way: never reuse this socket
                await self._connection.disconnect(nowait=True)
            await self._pool.release(self._connection)

    async def aclose(self) -> None:
        """Fail what is in flight and give the connection back (closing the store)."""
        self._fail(RedisConnectionError("the lock store is closing"))
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class _Replies(asyncio.Protocol):
    """A lane's replies, parsed and handed out in the transport's ``data_received`` (module docstring).

    Uses the connection's own hiredis reader, so replies come out exactly as
    redis-py would return them: error replies as its ``ResponseError``
    subclasses (``NoScriptError`` among them), which go to their caller
    alone. A RESP3 push message is no reply: it goes to the parser's push
    handler, as redis-py's ``read_response`` does with one. A connection
    error the reader reports, a reply no call asked for, or a closed socket
    fails the lane.
    """

    __slots__ = ("_failover", "_feed", "_gets", "_lane", "_parser", "_push_type", "_streams")

    def __init__(
        self,
        lane: _Lane,
        parser: Any,
        failover: Callable[[ResponseError], Exception | None] | None,
        streams: asyncio.BaseProtocol,
    ) -> None:
        self._lane = lane
        self._parser = parser
        self._feed: Callable[[bytes], None] = parser._reader.feed
        self._gets: Callable[[], Any] = parser._reader.gets
        push_type = getattr(parser, "_hiredis_PushNotificationType", None)
        self._push_type: type | None = push_type if isinstance(push_type, type) else None
        # A Sentinel connection's check of error replies, which its read_response makes.
        self._failover = failover
        # redis-py's own protocol (its StreamWriter's): told of the close and
        # of flow control, so that its wait_closed() and drain() still end.
        self._streams = streams

    @classmethod
    def take_over(cls, lane: _Lane, connection: AbstractConnection) -> bool:
        """Read ``connection``'s replies for ``lane`` from now on, if it parses with hiredis."""
        parser = getattr(connection, "_parser", None)
        reader = getattr(parser, "_reader", None)
        writer = getattr(connection, "_writer", None)
        if (
            not callable(getattr(reader, "gets", None))
            or not callable(getattr(reader, "feed", None))
            or not callable(getattr(parser, "handle_push_response", None))
            or not isinstance(writer, asyncio.StreamWriter)
        ):
            return False
        transport = writer.transport
        failover = getattr(connection, "failover_failure", None)  # FailoverAwareConnection's
        transport.set_protocol(cls(lane, parser, failover, transport.get_protocol()))
        return True

    def data_received(self, data: bytes) -> None:
        lane, gets, push_type = self._lane, self._gets, self._push_type
        if lane.closed:
            return  # replies to calls the lane has failed already
        self._feed(data)
        try:
            while not lane.closed:  # a retired lane closes at its last reply
                reply = gets()
                if reply is _NOT_ENOUGH_DATA or reply is False:
                    return
                if push_type is not None and isinstance(reply, push_type):
                    lane._spawn(self._parser.handle_push_response(reply))
                    continue
                if type(reply) is list and reply and isinstance(reply[0], RedisConnectionError):
                    reply = reply[0]
                if isinstance(reply, RedisConnectionError):
                    raise reply
                if self._failover is not None and isinstance(reply, ResponseError):
                    failure = self._failover(reply)
                    if failure is not None:
                        raise failure
                lane._answer(reply)
        except Exception as error:
            lane._fail(error)

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost fails the lane

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"the connection was lost ({exc})" if exc else "the connection closed"
        self._lane._fail(RedisConnectionError(reason))
        self._streams.connection_lost(exc)

    def pause_writing(self) -> None:
        self._streams.pause_writing()

    def resume_writing(self) -> None:
        self._streams.resume_writing()


def _join(packed: Any) -> bytes:
    return packed if isinstance(packed, bytes) else b"".join(packed)


class CommandPath:
    """Sends one store's short commands; see the module docstring for the promises.

    ``timeout`` bounds each call. ``budget`` bounds the calls in flight of a
    Cluster client (and so its connections); a standard or Sentinel client
    uses one connection whatever the number of calls. Errors are redis-py's
    (``RedisError``, ``OSError``) or ``TimeoutError``; the store maps them to
    ``LockStoreUnavailable``.
    """

    __slots__ = ("_client", "_direct", "_lane", "_opening", "_pool", "_slots", "budget", "timeout")

    def __init__(self, client: RedisClient, *, budget: int, timeout: float) -> None:
        self._client = client
        self.budget = budget
        self.timeout = timeout
        self._slots = asyncio.Semaphore(budget)
        # A standard or Sentinel-managed client talks to one server through
        # one pool: pipeline on one of its connections (no retry loop).
        self._direct = isinstance(client, aioredis.Redis) and client.connection_pool is not None
        self._pool: ConnectionPool | None = (
            client.connection_pool if isinstance(client, aioredis.Redis) else None
        )
        self._lane: _Lane | None = None
        self._opening: asyncio.Lock | None = None

    @property
    def in_flight(self) -> int:
        """Calls sent and not yet answered (for ``statistics()``)."""
        if self._direct:
            return self._lane.in_flight if self._lane is not None else 0
        return self.budget - self._slots._value

    async def evalsha(self, script: LuaScript, key: str, *args: Any) -> Any:
        """Run ``script`` with one declared key, loading it first if the server forgot it."""
        return await self.evalsha_keys(script, (key,), args)

    async def evalsha_keys(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run ``script`` with several declared keys (all in one hash slot), as :meth:`evalsha`."""
        try:
            return await self._one(("EVALSHA", script.sha, len(keys), *keys, *args))
        except NoScriptError:
            # A restarted or failed-over server forgot our scripts. (As one
            # word, "SCRIPT LOAD" goes to every node of a cluster.)
            await self._one(("SCRIPT LOAD", script.source))
            return await self._one(("EVALSHA", script.sha, len(keys), *keys, *args))

    async def call(self, *args: Any) -> Any:
        """Run one plain command (PING, DOORBELL's EVALSHA, ...)."""
        return await self._one(args)

    async def pipeline(self, calls: Sequence[tuple[LuaScript, str, Sequence[Any]]]) -> list[Any]:
        """Run several scripts in one round trip; each reply or error is returned in order.

        A script the server forgot is loaded and the batch sent once more:
        nothing in it ran, since every call in it failed the same way.
        """
        for attempt in range(2):
            commands = [("EVALSHA", script.sha, 1, key, *args) for script, key, args in calls]
            replies = await self._many(commands)
            missing = {
                script.name: script
                for (script, _, _), reply in zip(calls, replies, strict=True)
                if isinstance(reply, NoScriptError)
            }
            if attempt == 0 and missing:
                for script in missing.values():
                    await self._one(("SCRIPT LOAD", script.source))
                continue
            return replies
        raise AssertionError("unreachable")  # pragma: no cover

    async def _one(self, args: tuple[Any, ...]) -> Any:
        if not self._direct:
            async with asyncio.timeout(self.timeout), self._slots:
                return await self._client.execute_command(*args)
        lane = await self._current()
        (future,) = lane.queue((args,))
        lane.flush()
        return await future

    async def _many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        if not self._direct:
            async with asyncio.timeout(self.timeout), self._slots:
                pipe = self._client.pipeline(transaction=False)
                for command in commands:
                    pipe.execute_command(*command)
                result: list[Any] = await pipe.execute(raise_on_error=False)
                return result
        lane = await self._current()
        futures = lane.queue(commands)
        lane.flush()
        replies: list[Any] = []
        for future in futures:
            try:
                replies.append(await future)
            except ResponseError as error:
                replies.append(error)
        return replies

    async def _current(self) -> _Lane:
        lane = self._lane
        if lane is not None and lane.usable():
            return lane
        return await self._open()

    async def _open(self) -> _Lane:
        """The usable lane, opening one (a pooled connection, within ``timeout``) if there is none."""
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with asyncio.timeout(self.timeout), self._opening:
            lane = self._lane
            if lane is not None and lane.usable():
                return lane
            pool = self._pool
            assert pool is not None
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                if not connection.is_connected:
                    await connection.connect()
            except BaseException:
                await pool.release(connection)
                raise
            self._lane = lane = _Lane(pool, connection, self.timeout)
            return lane

    async def aclose(self) -> None:
        """Close the lane, failing the calls still in flight (the store is closing)."""
        lane, self._lane = self._lane, None
        if lane is not None:
            await lane.aclose()


def retries_on_timeout(client: RedisClient) -> bool:
    """Whether a Cluster client passed in would re-send a command after a timeout.

    Only Cluster clients are asked: for the others :class:`CommandPath`
    bypasses redis-py's retry loop.
    """
    if not isinstance(client, RedisCluster):
        return False
    retry = getattr(client, "retry", None)
    return retry is not None and getattr(retry, "_retries", 0) > 0
