"""Sentinel failover handling: drop every pooled connection to a master the moment it is replaced.

Why this exists
---------------
redis-py's Sentinel pool asks the Sentinels for the master only when it
opens a *new* connection. Connections already in the pool keep talking to
whatever server they were opened to. In a planned failover (``SENTINEL
FAILOVER``) the old master stays up and keeps calling itself master until a
Sentinel reconfigures it, which can take about 10 s after ``+switch-master``
(Sentinel only re-reads a server's ``INFO`` every 10 s). Writes sent over
pooled connections in that window are accepted by the old master and
discarded when it resyncs from the new one: acknowledged messages vanish and
conversations go back in time.

What it does
------------
Every Sentinel-mode client from :func:`convlock.redis.connection.create_client`
uses :class:`FailoverAwarePool`, whose connections are
:class:`FailoverAwareConnection`. Three signs of a failover make the pool
drop its connections (idle ones at once, busy ones as soon as they are
returned) and forget the master's address, so the next command asks the
Sentinels again instead of waiting for a socket timeout:

* a ``+switch-master`` message for the pool's service, published by any of
  the Sentinels (one listener per event loop and Sentinel set, shared by
  the lock store and the tracker store; it subscribes on every Sentinel so
  that the first to announce the switch is heard);
* a ``READONLY`` error reply: the server we write to is now a replica;
* a ``NOREPLICAS`` error reply: the server refuses writes because it lost
  its replicas (``min-replicas-to-write``), as an old master cut off from
  the others does.

The command that met the error fails (as a redis-py ``ConnectionError``);
it is never re-sent here, since the caller decides what is safe to retry.

Trade-offs and open questions
-----------------------------
* Dropping connections does not by itself make acknowledged writes safe:
  between the promotion and ``+switch-master`` the old master still accepts
  writes. The tracker store's ``min_replicas_acked`` (``WAIT``) closes that
  gap; this module shortens how long the failover costs.
* Busy connections are only marked: a blocking ``BLPOP`` on the old master
  runs until its own timeout. Closing it under its reader would turn a
  harmless late wake-up into an error for the waiting client.
* A listener reconnects to a Sentinel it lost after :data:`RESUBSCRIBE_DELAY`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import ConnectionPool, SSLConnection
from redis.asyncio.sentinel import SentinelConnectionPool, SentinelManagedConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError, ResponseError

__all__ = [
    "FAILOVER_ERRORS",
    "FailoverAwareConnection",
    "FailoverAwarePool",
    "FailoverAwareSSLConnection",
    "is_failover_error",
]

logger = logging.getLogger("convlock.redis")

#: Error-reply prefixes that mean "this server is no longer a usable master".
FAILOVER_ERRORS = ("READONLY", "NOREPLICAS")
#: Seconds before a listener tries a Sentinel again after losing it.
RESUBSCRIBE_DELAY = 1.0
#: Longest a listener blocks reading its subscription before looking up again.
_POLL = 1.0
_CHANNEL = "+switch-master"


def is_failover_error(error: BaseException) -> bool:
    """Whether ``error`` is an error reply that a failover explains (``READONLY``, ``NOREPLICAS``)."""
    # redis-py strips the READONLY code off the message and raises ReadOnlyError instead.
    if isinstance(error, ReadOnlyError):
        return True
    if not isinstance(error, ResponseError):
        return False
    text = str(error).lstrip("-")
    # Redis before 7 wraps an error raised inside a script: "ERR Error running
    # script ...: -READONLY You can't write ...".
    return text.startswith(FAILOVER_ERRORS) or any(f"-{code} " in text for code in FAILOVER_ERRORS)


class FailoverAwareConnection(SentinelManagedConnection):
    """A Sentinel-managed connection that reports failover error replies to its pool."""

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            # Past SentinelManagedConnection: it would turn READONLY into a
            # ConnectionError before we could see it.
            return await super(SentinelManagedConnection, self).read_response(*args, **kwargs)
        except ResponseError as error:
            failure = self.failover_failure(error)
            if failure is None:
                raise
            await self.disconnect()
            raise failure from error

    def failover_failure(self, error: ResponseError) -> RedisConnectionError | None:
        """The error that ends this connection if ``error`` says its master no longer takes writes, else None.

        For a failover reply from the master, the pool has forgotten the
        master and dropped its connections (:meth:`FailoverAwarePool.drop_master`)
        by the time this returns; the caller closes this connection and fails
        with the returned error. ``read_response`` uses it, and so does the
        lock store's command lane, which reads its replies without
        ``read_response`` (see :mod:`convlock.redis.commands`).
        """
        pool = self.connection_pool
        if not (is_failover_error(error) and pool.is_master):
            return None
        pool.drop_master(f"{error}".split(".")[0])
        failure = RedisConnectionError(
            f"{self.host}:{self.port} is no longer a writable master ({error}); "
            "the pool dropped its connections and will ask the Sentinels again"
        )
        failure.__cause__ = error
        return failure


class FailoverAwareSSLConnection(FailoverAwareConnection, SSLConnection):
    """:class:`FailoverAwareConnection` over TLS."""


class FailoverAwarePool(SentinelConnectionPool):
    """A Sentinel pool that drops its connections when its master is replaced.

    Promises: after :meth:`master_lost` (called on ``+switch-master``,
    ``READONLY`` or ``NOREPLICAS``), no command is sent to the old master
    over a connection taken from the pool afterwards: idle connections are
    closed, busy ones are closed when returned, and every reconnect asks the
    Sentinels for the master.
    """

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        ssl = bool(kwargs.pop("ssl", False))
        kwargs["connection_class"] = FailoverAwareSSLConnection if ssl else FailoverAwareConnection
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        #: How many times this pool dropped its connections for a failover.
        self.failovers_seen = 0
        self._closing: set[asyncio.Task[None]] = set()  # drop_master's closes, kept until done

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_master:
            _watch(self)
        return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]

    async def master_lost(self, reason: str) -> None:
        """Drop every connection to the current master and forget its address; wait for idle ones to close."""
        await _close_all(self._forget_master(reason))

    def drop_master(self, reason: str) -> None:
        """:meth:`master_lost` without waiting: the idle connections close in the background."""
        retired = self._forget_master(reason)
        if retired:
            task = asyncio.get_running_loop().create_task(_close_all(retired))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _forget_master(self, reason: str) -> list[Any]:
        """Forget the master, mark the busy connections, and take the idle ones out of the pool."""
        logger.warning(
            "Redis Sentinel service %r: %s; dropping pooled connections to %s",
            self.service_name,
            reason,
            self.master_address,
        )
        self.master_address = None
        # Take the idle connections out of the pool before any await, so
        # that no task can pick one up while it is being closed.
        retired, self._available_connections = self._available_connections, []
        for connection in list(self._in_use_connections):
            connection.mark_for_reconnect()  # type: ignore[no-untyped-call]
        self.failovers_seen += 1
        return retired

    async def disconnect(self, inuse_connections: bool = True) -> None:
        if inuse_connections:  # the client is closing: stop listening for it
            await _unwatch(self)
        await super().disconnect(inuse_connections)


async def _close_all(connections: list[Any]) -> None:
    await asyncio.gather(*(connection.disconnect() for connection in connections), return_exceptions=True)


# -- +switch-master listeners: one per (event loop, Sentinel set, service)


class _Listener:
    """Subscribes to ``+switch-master`` on every Sentinel and tells the pools of ``service``."""

    def __init__(self, key: tuple[Any, ...], template: FailoverAwarePool) -> None:
        self.key = key
        self.service = template.service_name
        self.pools: weakref.WeakSet[FailoverAwarePool] = weakref.WeakSet()
        self.stopped = False
        loop = asyncio.get_running_loop()
        self.tasks = [
            loop.create_task(self._listen(sentinel.connection_pool), name=f"convlock-sentinel-{i}")
            for i, sentinel in enumerate(template.sentinel_manager.sentinels)
        ]

    async def _listen(self, sentinel_pool: ConnectionPool) -> None:
        kwargs = {k: v for k, v in sentinel_pool.connection_kwargs.items() if k != "connection_pool"}
        pool = ConnectionPool(connection_class=sentinel_pool.connection_class, **kwargs)
        client = aioredis.Redis.from_pool(pool)
        try:
            while not self.stopped:
                pubsub = client.pubsub()
                try:
                    await pubsub.subscribe(_CHANNEL)
                    while not self.stopped:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=_POLL)
                        if message is not None:
                            await self._announced(message.get("data"))
                except (RedisError, OSError, TimeoutError) as error:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        # Python 3.11's asyncio.timeout (inside get_message) can turn a
                        # cancellation that lands as its own timer fires into
                        # TimeoutError. Seen: stop() then waited for ever on a listener
                        # that went on resubscribing (convlock verify hung at exit).
                        raise asyncio.CancelledError from error
                    logger.debug("Sentinel listener: %s; resubscribing", error)
                finally:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
                await asyncio.sleep(RESUBSCRIBE_DELAY)
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _announced(self, data: Any) -> None:
        # "<service> <old ip> <old port> <new ip> <new port>"
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
        parts = text.split()
        if len(parts) != 5 or parts[0] != self.service or not parts[4].isdigit():
            return
        # Every Sentinel announces the switch once it learns of it. Each
        # announcement drops the connections again, on purpose: a pool that
        # reconnected in between may have asked a Sentinel that had not yet
        # learned of the switch, and so reconnected to the old master.
        for pool in list(self.pools):
            await pool.master_lost(f"+switch-master to {parts[3]}:{parts[4]}")

    async def stop(self) -> None:
        self.stopped = True  # ends the loops even if a cancellation is lost (see _listen)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


_listeners: dict[tuple[Any, ...], _Listener] = {}


def _key(pool: FailoverAwarePool) -> tuple[Any, ...]:
    sentinels = tuple(
        (s.connection_pool.connection_kwargs.get("host"), s.connection_pool.connection_kwargs.get("port"))
        for s in pool.sentinel_manager.sentinels
    )
    return (id(asyncio.get_running_loop()), sentinels, pool.service_name)


def _watch(pool: FailoverAwarePool) -> None:
    key = _key(pool)
    listener = _listeners.get(key)
    if listener is None or all(task.done() for task in listener.tasks):
        listener = _listeners[key] = _Listener(key, pool)
    listener.pools.add(pool)


async def _unwatch(pool: FailoverAwarePool) -> None:
    try:
        key = _key(pool)
    except RuntimeError:  # no running loop: nothing can be listening
        return
    listener = _listeners.get(key)
    if listener is None:
        return
    listener.pools.discard(pool)
    if not listener.pools:
        del _listeners[key]
        await listener.stop()
