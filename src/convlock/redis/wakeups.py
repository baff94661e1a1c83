"""Wake-ups from other processes: a few blocking reads shared by every waiter of a store.

What needs a Redis wake-up
--------------------------
When a release in *this* process hands the lock to a ticket of this process,
the release script's reply says so and the store resolves that waiter
directly: no push, no blocking read, no extra round trip. Only a waiter
whose predecessor lives in another process must hear from Redis, and of the
waiters of one conversation in this process only the first can be next: the
others are behind it, so their turn comes through this process's own
release. So the store asks this hub to watch at most one wake-up list per
conversation (:meth:`WakeupHub.watch`), that of its first local waiter, and
only while no local hold of that conversation is ahead of it.

How the hub reads
-----------------
Scripts that grant a ticket of another process ``RPUSH`` to that ticket's own
list (see :mod:`convlock.redis.scripts`): ``g`` for "granted", ``r<us>`` for
"the holder changed; its lease ends in <us>". A *reader* is one connection
blocked in ``BLPOP list1 list2 ... doorbell`` over many lists at once, so a
process with a thousand waiting conversations still uses a handful of
connections: at most ``budget`` readers per store. Lists are assigned to
readers by a hash of the conversation (standalone and Sentinel), or by hash
slot in a Cluster, where one ``BLPOP`` may only name keys of one slot.

A list added while its reader is blocked would not be read until that
``BLPOP`` returns, so the hub rings the reader's *doorbell*: a push to a list
of its own that every ``BLPOP`` of that reader includes (with a 250 ms TTL, so
a ring that no reader took is gone at once). That costs one short command, off the
waiter's path; a list removed needs no doorbell, since a stale list in a
``BLPOP`` is harmless. Messages are stored in the list, so a push made while
no reader is blocked is read when it next blocks: nothing is lost between
two ``BLPOP`` calls.

Guarantees and fallbacks
------------------------
* Only the next waiter wakes: each list belongs to one ticket.
* A wake-up is never needed for correctness: every waiter also re-checks on
  a timer (when the holder's lease ends, and its own lease keep-alive), so
  a lost push, a reader that lost its connection, or a reader that could
  not be had costs latency, never a grant.
* Beyond the budget (a Cluster with more slots in use than readers), a
  waiter is told it is not watched and re-checks every
  ``FALLBACK_POLL`` seconds: slower, never failing.
* A reader's ``BLPOP`` is bounded on the client's clock, not by the
  client's ``socket_timeout``: a short ``socket_timeout`` never fails a
  healthy wait, and a reader whose server stopped answering reconnects.

Open question: the doorbell costs a round trip per new watched list; with
hundreds of conversations each handing over between processes every few
milliseconds, ``CLIENT UNBLOCK`` on the reader's client ID would be as
cheap but needs the reader's node in a Cluster.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import zlib
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from . import scripts
from .commands import CommandPath
from .connection import RedisClient

__all__ = ["FALLBACK_POLL", "WakeupHub"]

logger = logging.getLogger("convlock.redis")

#: How often a waiter that no reader watches re-checks, in seconds.
FALLBACK_POLL = 0.05
#: How long one BLPOP blocks before the reader re-arms (seconds). Longer means
#: fewer idle round trips; a reader with nothing to watch stops at the next return.
_BLOCK_SECONDS = 2.0
#: Slack over the BLPOP's own timeout before the client gives up on a reply:
#: Redis times blocked clients out on its ``hz`` tick (100 ms by default).
_READ_SLACK = 0.5
#: A doorbell only has to last from its push to the blocked reader's pop
#: (microseconds), or to a reader's next BLPOP (which reads the new lists
#: anyway): a short TTL means a ring that found no reader is gone at once.
_DOORBELL_TTL_MS = 250
_RECONNECT_DELAYS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)

Dispatch = Callable[[str, bytes], None]


class _Reader:
    """One blocking connection and the lists it watches."""

    __slots__ = ("armed", "doorbell", "group", "keys", "ringing", "task")

    def __init__(self, group: Any, doorbell: str) -> None:
        self.group = group
        self.doorbell = doorbell
        self.keys: set[str] = set()
        self.armed: frozenset[str] | None = None  # the lists of the BLPOP in flight
        self.ringing = False
        self.task: asyncio.Task[None] | None = None


class WakeupHub:
    """Reads wake-up lists for one store with at most ``budget`` blocking connections.

    ``dispatch(list_key, message)`` is called for every message read, in the
    order each list received them. Watching is idempotent and costs no round
    trip unless the list's reader is blocked (then: one doorbell).
    """

    def __init__(
        self,
        client: RedisClient,
        commands: CommandPath,
        *,
        prefix: str,
        budget: int,
        dispatch: Dispatch,
    ) -> None:
        self._client = client
        self._commands = commands
        self._budget = budget
        self._dispatch = dispatch
        self._cluster = isinstance(client, RedisCluster)
        self._prefix = prefix
        self._store_id = os.urandom(6).hex()
        self._readers: dict[Any, _Reader] = {}
        self._where: dict[str, _Reader] = {}
        self._closed = False
        self.reads = 0
        self.doorbells = 0
        self.reconnects = 0

    @property
    def readers(self) -> int:
        """Readers running now (each holds one connection while it runs)."""
        return len(self._readers)

    def watch(self, key: str, tag: str) -> bool:
        """Read ``key`` (a wake-up list of conversation hash tag ``tag``) until unwatched.

        Returns False when no reader can take it (Cluster, budget spent): the
        caller must then re-check on its own every ``FALLBACK_POLL`` seconds.
        """
        if self._closed:
            return False
        if key in self._where:
            return True
        group: Any
        if self._cluster:
            assert isinstance(self._client, RedisCluster)
            group = self._client.keyslot(key)
        else:
            group = zlib.crc32(tag.encode()) % self._budget
        reader = self._readers.get(group)
        if reader is None:
            if len(self._readers) >= self._budget:
                return False
            # In a Cluster the doorbell must share the slot of the lists it
            # sits beside: give it the conversation's hash tag.
            where = f"{{{tag}}}" if self._cluster else str(group)
            reader = _Reader(group, f"{self._prefix}:{where}:bell:{self._store_id}")
            self._readers[group] = reader
        reader.keys.add(key)
        self._where[key] = reader
        if reader.task is None or reader.task.done():
            reader.task = asyncio.get_running_loop().create_task(self._read(reader))
        elif reader.armed is not None and key not in reader.armed and not reader.ringing:
            reader.ringing = True
            self.doorbells += 1
            asyncio.get_running_loop().create_task(self._ring(reader))
        return True

    def unwatch(self, key: str) -> None:
        """Stop reading ``key``; a message already on it stays there (the list has a TTL)."""
        reader = self._where.pop(key, None)
        if reader is not None:
            reader.keys.discard(key)

    async def _ring(self, reader: _Reader) -> None:
        try:
            await self._commands.evalsha(scripts.DOORBELL, reader.doorbell, _DOORBELL_TTL_MS)
        except (RedisError, OSError, TimeoutError) as error:
            # The list is read when the BLPOP returns anyway (within
            # _BLOCK_SECONDS), and waiters re-check on their timers.
            logger.debug("could not ring the wake-up reader's doorbell: %s", error)
        finally:
            reader.ringing = False

    async def _read(self, reader: _Reader) -> None:
        """Block on the reader's lists until it has none left (or the hub closes)."""
        failures = 0
        conn: Any = None
        node: Any = None
        pool: Any = None
        try:
            while reader.keys and not self._closed:
                armed = frozenset(reader.keys)
                try:
                    if conn is None:
                        conn, node, pool = await self._connection(next(iter(armed)))
                    reader.armed = armed
                    await conn.send_command("BLPOP", *armed, reader.doorbell, f"{_BLOCK_SECONDS:.3f}")
                    # read_response(timeout=inf): no socket timeout on this
                    # read; the client-side bound is ours.
                    async with asyncio.timeout(_BLOCK_SECONDS + self._commands.timeout + _READ_SLACK):
                        reply = await conn.read_response(timeout=math.inf)
                    failures = 0
                except (RedisError, OSError, TimeoutError) as error:
                    reader.armed = None
                    if conn is not None:
                        await conn.disconnect(nowait=True)
                        self._give_back(conn, node, pool)
                        conn = None
                    self.reconnects += 1
                    delay = _RECONNECT_DELAYS[min(failures, len(_RECONNECT_DELAYS) - 1)]
                    failures += 1
                    logger.debug("wake-up reader failed (%s); retrying in %gs", error, delay)
                    await asyncio.sleep(delay)
                    continue
                reader.armed = None
                if reply is None:
                    continue
                key, message = reply
                key = key.decode() if isinstance(key, bytes) else str(key)
                if key == reader.doorbell:
                    continue
                self.reads += 1
                if isinstance(message, str):
                    message = message.encode()
                try:
                    self._dispatch(key, message)
                except Exception:  # pragma: no cover - a bug in dispatch must not kill the reader
                    logger.exception("wake-up dispatch failed for %s", key)
        except asyncio.CancelledError:
            if conn is not None:
                await conn.disconnect(nowait=True)
            raise
        finally:
            reader.armed = None
            if conn is not None:
                self._give_back(conn, node, pool)
            # Normally it stops with no keys left. If it stopped otherwise (a
            # bug), its waiters fall back to their timers, and the next
            # watch() starts a new reader.
            if self._readers.get(reader.group) is reader:
                del self._readers[reader.group]
            for key in reader.keys:
                self._where.pop(key, None)

    async def _connection(self, key: str) -> tuple[Any, Any, Any]:
        """A connection of its own for a reader: from the client's pool, or the key's node."""
        client = self._client
        if isinstance(client, RedisCluster):
            await client.initialize()
            node = client.get_node_from_key(key)
            if node is None:
                raise RedisError(f"no cluster node serves {key!r} yet")
            conn = node.acquire_connection()
            return conn, node, None
        assert isinstance(client, aioredis.Redis)
        pool = client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        return conn, None, pool

    def _give_back(self, conn: Any, node: Any, pool: Any) -> None:
        if node is not None:
            node.release(conn)
        elif pool is not None:
            asyncio.get_running_loop().create_task(pool.release(conn))

    async def aclose(self) -> None:
        """Stop every reader and return its connection."""
        self._closed = True
        tasks = [reader.task for reader in self._readers.values() if reader.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                if (current := asyncio.current_task()) is not None and current.cancelling():
                    raise
        self._readers.clear()
        self._where.clear()
