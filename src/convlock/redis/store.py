"""RedisLockStore: FIFO ticket locks that processes on different hosts can share.

Design
------
Each conversation's state lives in a Redis hash, plus a sorted set of
waiting tickets while anyone waits (layout in :mod:`convlock.redis.keys`),
and every change to it is one Lua script (:mod:`convlock.redis.scripts`)
run with ``EVALSHA``. A script is atomic and costs one round trip, so:

* an uncontended acquire is one ``EVALSHA`` (draw a ticket; it is granted at
  once), and a release is one more (withdraw it; serve the next);
* leases are measured on the Redis server's clock (``TIME`` inside the
  scripts), so hosts with skewed wall clocks agree on when a lease ends;
* ticket numbers are ``max(last + 1, server time in µs)`` and the counter of
  an idle conversation is deleted only once the clock has passed it, so
  tickets strictly increase per conversation even across deletions: they are
  fencing tokens (see ``docs/redis.md``).

Wake-up: a blocking list per ticket
-----------------------------------
When a script grants a ticket to a waiter (a release, a withdrawal, a lapsed
lease), it ``RPUSH``-es to that ticket's own list, ``P:{conv}:w:<ticket>``,
on which the waiter sits in ``BLPOP``. Only that waiter wakes: there is no
thundering herd, not even a harmless one, and the grant is already done when
it wakes, so hand-off costs no further round trip.

We chose lists over pub/sub (one subscriber connection per store) because:

* a push is *stored*: if the waiter is between two ``BLPOP`` calls, or its
  connection dropped and came back, the wake-up is still there. A pub/sub
  message sent at that moment is gone for good, and we would rely on the
  timer to notice.
* it needs nothing extra in Redis Cluster: the list shares the
  conversation's hash slot, so the script can push to it. Pub/sub there
  needs sharded channels (``SPUBLISH``) hashed to that slot, hence a
  ``SSUBSCRIBE`` round trip per wait and per-node subscriber connections.
* there is no subscription state to rebuild after a reconnect or failover.

The price: each waiting task holds one pooled connection while it waits (a
process with 1,000 waiters at once opens 1,000 connections), and a waiter
that is cancelled mid-``BLPOP`` costs that connection (redis-py closes it,
since a reply may be in flight). Waiters are few in practice: a lock is per
conversation.

Because a push can still be missed (the waiter's process stalled past the
list's TTL, or a failover lost it), a waiter's ``BLPOP`` times out at the
latest when the holder's lease ends, after ``lifetime/3``, or well before
``socket_timeout``, whichever is first; it then runs the ``check`` script,
which serves the queue (dropping a dead holder) and renews the waiter's own
lease. Waiting tickets carry leases because a waiter's process can die.

Leases and renewal
------------------
A granted ticket's lease is ``lifetime`` from its grant. Holders with
``renew=True`` are renewed by *one* task per store, which renews every hold
that is due in one pipeline, each at least every ``lifetime/3``. A hold
learns it is lost (``held.lost``) when a renewal says so, or when its local
deadline passes: the lease was granted no earlier than the request that
saw it, so ``request sent + lifetime`` (on the local monotonic clock) is a
safe bound even when renewals cannot reach Redis.

Failures
--------
Every Redis call is bounded by ``socket_timeout``: redis-py bounds the
connect and each read and write by it, which for a single server bounds the
call; with Sentinel or Cluster, where a call may try several servers in
turn, an ``asyncio.timeout`` bounds the whole call as well. Connection
errors, timeouts and error replies become
:class:`~convlock.LockStoreUnavailable` naming the server. Nothing is
retried blindly: a script that may have run is not sent again. After
Redis comes back, the pool reconnects on the next call.

A waiter that is cancelled withdraws its ticket in a background task (so
cancellation takes effect at once and the withdrawal still happens), by
number, or by draw ID when it was cancelled before the draw's reply came
back; the store's ``aclose()`` waits for those. A release that cannot reach Redis is
logged and counted, not raised: the work is done, and the lease lets the
next ticket in within ``lifetime``.

Operations
----------
Every lock event goes to the store's observer when it has one
(:mod:`convlock.observe`; metrics and logs hang off it); each call sits
beside a round trip, so it costs nothing worth measuring. ``revoke()`` runs
the ``revoke`` script: the holder is revoked as by ``force_release()``, or
only if it still holds the ticket named; a waiting ticket leaves the queue
and its wake-up list receives ``scripts.REVOKED_MARK`` instead of a grant,
so its waiter raises ``LockLostError`` at once (or at its next ``check``,
which then answers -2). ``conversations()`` pages through ``SCAN``.

Trade-offs and open questions
-----------------------------
* A draw whose reply is lost (the caller was cancelled, or timed out, after
  the script ran) made a ticket its caller cannot name. Each draw therefore
  carries a draw ID, kept with its ticket (a hash field per ticket), and
  the ``withdraw`` script removes the ticket by that ID in the background.
  If Redis cannot be reached for that either, the orphan ticket stalls the
  queue for up to one lifetime, until its lease lapses.
* Asynchronous replication can lose a grant in a failover (see
  ``docs/redis.md``); the fencing token is the protection.
* Ticket numbers depend on the server clock not jumping back by more than a
  conversation's idle time. NTP slews rather than steps, but a manual clock
  change could break the strict increase across an idle gap.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, NoReturn

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..config import LockStoreSettings, RedisSettings
from ..errors import LockLostError, LockStoreUnavailable, LockTimeoutError
from ..ids import check_conversation_id
from ..observe import GrantReason
from ..store import HeldLock, LockSnapshot, LockStore, TicketLease, check_seconds, entry_refusal
from ..tickets import renew_interval
from . import scripts
from .connection import STALE_CHECK_KWARGS, RedisClient, create_client, describe
from .keys import ConversationKeys, KeySpace

__all__ = ["RedisLockStore"]

logger = logging.getLogger("convlock.redis")

_US = 1_000_000
#: A waiter's BLPOP must return before the socket read times out.
_BLPOP_SHARE_OF_SOCKET_TIMEOUT = 0.5
#: Shortest BLPOP: Redis reads "0" as "for ever", and ms is its resolution.
_MIN_POLL = 0.001
#: How soon a renewal that could not reach Redis is tried again, as a share of the lifetime.
_RENEW_RETRY_SHARE = 0.1
_SCAN_BATCH = 200


class _RedisHold(HeldLock):
    """One ``lock()`` call: its context manager, its ticket, and the ``held`` handle."""

    __slots__ = (
        "_deadline",
        "_draw",
        "_granted_at",
        "_keys",
        "_lifetime",
        "_lifetime_arg",
        "_number",
        "_renew",
        "_renew_at",
        "_revoked",
        "_store",
        "_wait_timeout",
        "conversation_id",
    )

    def __init__(
        self,
        store: RedisLockStore,
        conversation_id: str,
        *,
        keys: ConversationKeys,
        lifetime: float,
        renew: bool,
        wait_timeout: float | None,
    ) -> None:
        self._store = store
        self.conversation_id = conversation_id
        self._keys = keys
        self._lifetime = lifetime
        self._lifetime_arg = max(1, round(lifetime * _US))
        self._renew = renew
        self._wait_timeout = wait_timeout
        self._number = 0
        self._revoked = False
        self._deadline = -math.inf
        self._renew_at = math.inf
        self._granted_at = math.nan
        # Names this hold's draw in Redis, so that a ticket whose number never
        # reached us (cancelled or timed out mid-draw) can still be withdrawn.
        self._draw = f"{store._draw_prefix}{next(store._draw_count)}"

    @property
    def ticket(self) -> int:
        return self._number

    @property
    def lost(self) -> bool:
        return self._revoked or time.monotonic() >= self._deadline

    async def ensure(self) -> None:
        """Ask Redis whether this ticket still holds; raise ``LockLostError`` if not.

        Does not extend the lease. Raises ``LockStoreUnavailable`` when Redis
        cannot say and the local deadline has not passed yet.
        """
        if not self.lost:
            reply = await self._store._eval(scripts.RENEW, self._keys, self._number, 0)
            if reply == 1:
                return
            self._revoked = True
            self._store._lost += 1
            if self._store._observer is not None:
                self._store._observer.lapsed(self.conversation_id, self._number)
        raise LockLostError.for_ticket(self.conversation_id, self._number, self._lifetime)

    async def __aenter__(self) -> _RedisHold:
        store = self._store
        if self._number or store._closed:
            raise entry_refusal(self.conversation_id, entered=bool(self._number))
        sent = time.monotonic()
        try:
            reply = await store._eval(scripts.ISSUE, self._keys, self._lifetime_arg, self._draw)
        except asyncio.CancelledError:
            # The draw may have run with its reply on the way: withdraw
            # whatever ticket it made, or it would block the conversation
            # for a whole lease.
            store._withdraw_later(self._keys, 0, draw=self._draw)
            raise
        except LockStoreUnavailable as error:
            if _may_have_run(error):
                store._withdraw_later(self._keys, 0, draw=self._draw)
            raise
        if type(reply) is int:  # granted at once: the ticket alone
            self._number = reply
            self._deadline = sent + self._lifetime
            if store._observer is not None:
                self._granted_at = now = time.monotonic()
                store._observer.granted(self.conversation_id, reply, now - sent, "immediate")
        else:
            self._number = reply[0]
            await store._wait(self, reply[1], sent)
        if self._renew:
            store._register(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        store = self._store
        if self._renew:
            store._renewing.discard(self)
        if store._observer is not None and not math.isnan(self._granted_at):
            store._observer.released(self.conversation_id, self._number, time.monotonic() - self._granted_at)
        if self._revoked:
            return  # a renewal or ensure() saw it revoked: nothing to release
        try:
            await store._eval(scripts.RELEASE, self._keys, self._number)
        except asyncio.CancelledError:
            # The script may or may not have run; it is idempotent, so run it
            # again where no cancellation can reach it.
            store._withdraw_later(self._keys, self._number)
            raise
        except LockStoreUnavailable as error:
            store._release_failures += 1
            logger.warning(
                "could not release ticket %s of conversation %r (%s); the lock passes on "
                "when its %gs lease ends",
                self._number,
                self.conversation_id,
                error,
                self._lifetime,
            )
        self._deadline = -math.inf


class RedisLockStore(LockStore):
    """Per-conversation FIFO ticket locks in Redis, shared by every process that uses it.

    Construct it from settings (``RedisLockStore.from_settings(settings)``,
    which the ``lock_store:`` block with ``type: redis`` does), or directly::

        RedisLockStore("redis://127.0.0.1:6380/0", key_prefix="app", lifetime=30)
        RedisLockStore(RedisSettings(url="redis.internal", use_ssl=True))
        RedisLockStore(existing_client)  # a redis.asyncio Redis or RedisCluster

    A store built from settings or a URL owns its client and closes it in
    :meth:`aclose`; a client passed in is left open.

    Promises, across all processes and hosts sharing the Redis and the
    ``key_prefix``:

    * Mutual exclusion while leases hold: at most one live ticket per
      conversation is granted. A holder that stops renewing (crash, hang,
      ``renew=False`` past ``lifetime``) loses the lock when its lease ends.
    * Fairness: tickets are granted strictly in ticket order; a waiter whose
      process died is skipped once its lease (renewed while it waits) ends.
    * Fencing: ``held.ticket`` strictly increases per conversation, even after
      the conversation went idle and its keys were deleted.
    * Hand-off wakes exactly the next waiter; waiters also re-check on a
      timer, at the latest when the holder's lease ends.
    * Cancellation or ``wait_timeout`` withdraws the waiter's ticket.
    * No leaks: an idle conversation has no keys; every key has a TTL that
      ends shortly after the leases it covers.
    * Failures: an unreachable Redis raises ``LockStoreUnavailable`` naming it
      within ``socket_timeout``; the store reconnects by itself.

    Guarantees rest on Redis keeping what it acknowledged: a failover to a
    replica that had not yet received a grant can grant the lock twice.
    Protect downstream writes with the fencing token.
    """

    def __init__(
        self,
        redis: RedisSettings | RedisClient | str | None = None,
        *,
        key_prefix: str | None = None,
        lifetime: float | None = None,
        wait_timeout: float | None = None,
        socket_timeout: float | None = None,
    ) -> None:
        super().__init__(lifetime=lifetime, wait_timeout=wait_timeout)
        timeout = check_seconds("socket_timeout", socket_timeout)
        if redis is None:
            redis = RedisSettings()
        if isinstance(redis, RedisSettings):
            if timeout is not None and timeout != redis.socket_timeout:
                redis = redis.model_copy(update={"socket_timeout": timeout})
            self._client: RedisClient = create_client(redis, retries=0)
            self._owns_client = True
            self._where = describe(redis)
            self._socket_timeout = redis.socket_timeout
            prefix = redis.key_prefix if key_prefix is None else key_prefix
        elif isinstance(redis, str):
            self._socket_timeout = timeout or RedisSettings().socket_timeout
            self._client = aioredis.Redis.from_url(
                redis,
                socket_timeout=self._socket_timeout,
                socket_connect_timeout=self._socket_timeout,
                retry=Retry(NoBackoff(), 0),
                **STALE_CHECK_KWARGS,
            )
            self._owns_client = True
            self._where = _describe_client(self._client)
            prefix = key_prefix or "convlock"
        elif isinstance(redis, aioredis.Redis | RedisCluster):
            self._client = redis
            self._owns_client = False
            self._where = _describe_client(redis)
            self._socket_timeout = timeout or _client_socket_timeout(redis) or RedisSettings().socket_timeout
            prefix = key_prefix or "convlock"
        else:
            raise TypeError(
                "RedisLockStore takes RedisSettings, a redis:// URL or a redis.asyncio client, "
                f"got {type(redis).__name__}"
            )
        self._space = KeySpace(prefix)
        # A plain client talks to one server; Sentinel and Cluster clients
        # may try several in turn (see _eval).
        self._one_server = type(self._client) is aioredis.Redis and not hasattr(
            self._client.connection_pool, "service_name"
        )
        self._closed = False
        self._renewing: set[_RedisHold] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._renewer_target = math.inf
        self._renewer_poke: asyncio.Event | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._draw_prefix = os.urandom(6).hex() + ":"
        self._draw_count = itertools.count(1)
        # Counters for statistics(); bumped off the uncontended path.
        self._contended = 0
        self._wakeups = 0
        self._rechecks = 0
        self._requeued = 0
        self._timeouts = 0
        self._cancelled = 0
        self._renewals = 0
        self._renewal_errors = 0
        self._lost = 0
        self._release_failures = 0
        self._forced = 0
        self._unavailable = 0

    @classmethod
    def from_settings(cls, settings: LockStoreSettings) -> RedisLockStore:
        """The store that a ``lock_store:`` block with ``type: redis`` describes."""
        return cls(settings, lifetime=settings.lifetime, wait_timeout=settings.wait_timeout)

    @property
    def client(self) -> RedisClient:
        """The redis-py client this store uses."""
        return self._client

    @property
    def key_prefix(self) -> str:
        """The prefix of every key this store writes."""
        return self._space.prefix

    # -- the lock

    def lock(
        self,
        conversation_id: str,
        *,
        lifetime: float | None = None,
        wait_timeout: float | None = None,
        renew: bool = True,
    ) -> _RedisHold:
        """Draw a ticket for ``conversation_id``; see :meth:`LockStore.lock` for the promises.

        In Redis the lease is on the server's clock. With ``renew=True`` this
        store's renewal task extends it every ``lifetime/3``; a waiting
        ticket's lease is renewed by its waiter whatever ``renew`` says.
        Raises ``LockStoreUnavailable`` (nothing held) when Redis cannot be
        reached within ``socket_timeout``.
        """
        check_conversation_id(conversation_id)
        return _RedisHold(
            self,
            conversation_id,
            keys=self._space.keys(conversation_id),
            lifetime=self.lifetime if lifetime is None else check_seconds("lifetime", lifetime) or 0.0,
            renew=bool(renew),
            wait_timeout=(
                self.wait_timeout if wait_timeout is None else check_seconds("wait_timeout", wait_timeout)
            ),
        )

    async def _wait(self, hold: _RedisHold, holder_left_us: int, sent: float) -> None:
        """Park ``hold`` until granted; withdraw its ticket on any exit but success."""
        self._contended += 1
        keys = hold._keys
        observer = self._observer
        if observer is not None:
            observer.waiting(hold.conversation_id, hold._number)
        deadline = None if hold._wait_timeout is None else sent + hold._wait_timeout
        # The last request whose reply said "not yet granted": a later grant
        # happened after it was sent, which bounds the lease from below.
        probe_sent = sent
        reissuing = False
        try:
            while True:
                poll = min(
                    renew_interval(hold._lifetime),
                    holder_left_us / _US + _MIN_POLL,
                    self._socket_timeout * _BLPOP_SHARE_OF_SOCKET_TIMEOUT,
                )
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        await self._give_up(hold)
                    poll = min(poll, left)
                pushed = await self._blpop(keys.wake(hold._number), max(poll, _MIN_POLL))
                if pushed == scripts.REVOKED_MARK.encode():
                    raise self._revoked_waiter(hold)
                if pushed is not None:
                    self._wakeups += 1
                    hold._deadline = probe_sent + hold._lifetime
                    self._observe_grant(hold, sent, "handoff")
                    return
                self._rechecks += 1
                checked = time.monotonic()
                state, holder_left_us = await self._eval(scripts.CHECK, keys, hold._number)
                if state == 1:
                    # The grant may be older than this check (a release
                    # pushed it after our BLPOP timed out): the lease began
                    # after the last "not yet" and has holder_left_us left
                    # as of some moment after `checked`.
                    hold._deadline = max(
                        probe_sent + hold._lifetime, checked + holder_left_us / _US
                    )
                    self._observe_grant(hold, sent, "recheck")
                    return
                if state == -2:
                    raise self._revoked_waiter(hold)
                logger.debug(
                    "conversation %r ticket %d: re-checked on its timer, %s",
                    hold.conversation_id,
                    hold._number,
                    "still waiting" if state == 0 else "its waiting lease had lapsed; queueing again",
                    extra={
                        "conversation_id": hold.conversation_id,
                        "ticket": hold._number,
                        "event": "recheck",
                    },
                )
                if state == -1:
                    # Our own waiting lease ended (we could not renew it in
                    # time): we lost our place, so queue again at the back.
                    self._requeued += 1
                    checked = time.monotonic()
                    reissuing = True
                    reply = await self._eval(scripts.ISSUE, keys, hold._lifetime_arg, hold._draw)
                    reissuing = False
                    if type(reply) is int:
                        hold._number = reply
                        hold._deadline = checked + hold._lifetime
                        self._observe_grant(hold, sent, "recheck")
                        return
                    hold._number, holder_left_us = reply
                probe_sent = checked
        except asyncio.CancelledError:
            self._cancelled += 1
            self._withdraw_later(keys, hold._number, draw=hold._draw if reissuing else None)
            if observer is not None:
                observer.abandoned(hold.conversation_id, hold._number, time.monotonic() - sent, "cancelled")
            raise
        except LockStoreUnavailable:
            self._withdraw_later(keys, hold._number, draw=hold._draw if reissuing else None)
            if observer is not None:
                observer.abandoned(hold.conversation_id, hold._number, time.monotonic() - sent, "error")
            raise
        except LockLostError:
            if observer is not None:
                observer.abandoned(hold.conversation_id, hold._number, time.monotonic() - sent, "revoked")
            raise

    def _observe_grant(self, hold: _RedisHold, sent: float, reason: GrantReason) -> None:
        if self._observer is not None:
            hold._granted_at = now = time.monotonic()
            self._observer.granted(hold.conversation_id, hold._number, now - sent, reason)

    def _revoked_waiter(self, hold: _RedisHold) -> LockLostError:
        return LockLostError(
            f"ticket {hold._number} of conversation {hold.conversation_id!r} was revoked by an operator "
            "before it was served",
            conversation_id=hold.conversation_id,
        )

    async def _give_up(self, hold: _RedisHold) -> NoReturn:
        """Withdraw a waiter whose ``wait_timeout`` passed and raise ``LockTimeoutError``."""
        self._timeouts += 1
        await self._eval(scripts.RELEASE, hold._keys, hold._number, 1)
        if self._observer is not None:
            self._observer.timed_out(hold.conversation_id, hold._number, hold._wait_timeout or 0.0)
        raise LockTimeoutError(
            f"waited {hold._wait_timeout:g}s for conversation {hold.conversation_id!r} without "
            f"being served (ticket {hold._number} withdrawn)",
            conversation_id=hold.conversation_id,
        )

    def _withdraw_later(self, keys: ConversationKeys, ticket: int, *, draw: str | None = None) -> None:
        """Withdraw ``ticket`` in the background, out of reach of the caller's cancellation.

        With ``draw``, withdraw instead whatever ticket that draw made, for a
        draw whose reply (the ticket's number) was lost.
        """

        async def withdraw() -> None:
            try:
                if draw is None:
                    await self._eval(scripts.RELEASE, keys, ticket, 1)
                else:
                    await self._eval(scripts.WITHDRAW, keys, draw)
            except LockStoreUnavailable as error:
                logger.warning(
                    "could not withdraw ticket %s (%s); it lapses when its lease ends",
                    ticket or f"of draw {draw}",
                    error,
                )

        task = asyncio.get_running_loop().create_task(withdraw())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- renewal

    def _register(self, hold: _RedisHold) -> None:
        """Hand a renewing hold to the store's renewal task, starting it if needed."""
        hold._renew_at = time.monotonic() + renew_interval(hold._lifetime)
        self._renewing.add(hold)
        renewer = self._renewer
        if renewer is None or renewer.done():
            self._renewer_poke = asyncio.Event()
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())
        elif hold._renew_at < self._renewer_target:
            assert self._renewer_poke is not None
            self._renewer_poke.set()

    async def _renew_forever(self) -> None:
        """Renew every due hold, sleeping until the next is due; runs until ``aclose``."""
        poke = self._renewer_poke
        assert poke is not None
        idle = renew_interval(self.lifetime)
        while not self._closed:
            now = time.monotonic()
            due = [hold for hold in self._renewing if hold._renew_at <= now]
            if due:
                await self._renew(due)
                continue
            target = min((hold._renew_at for hold in self._renewing), default=now + idle)
            self._renewer_target = target
            poke.clear()
            try:
                async with asyncio.timeout(max(0.0, target - now)):
                    await poke.wait()
            except TimeoutError:
                pass

    async def _renew(self, holds: Sequence[_RedisHold]) -> None:
        """Extend the leases of ``holds`` in one pipeline; mark revoked ones lost."""
        sent = time.monotonic()
        try:
            replies = await self._pipeline(
                scripts.RENEW, [(hold._keys, (hold._number, 1)) for hold in holds]
            )
        except LockStoreUnavailable as error:
            replies = [error] * len(holds)
        for hold, reply in zip(holds, replies, strict=True):
            if reply == 1:
                self._renewals += 1
                hold._deadline = sent + hold._lifetime
                hold._renew_at = sent + renew_interval(hold._lifetime)
            elif reply == 0:
                self._lost += 1
                hold._revoked = True
                self._renewing.discard(hold)
                if self._observer is not None:
                    self._observer.lapsed(hold.conversation_id, hold._number)
            else:
                # Try again soon; if this keeps failing, the local deadline
                # passes and the hold reports itself lost.
                self._renewal_errors += 1
                hold._renew_at = time.monotonic() + hold._lifetime * _RENEW_RETRY_SHARE
                if hold.lost:
                    self._renewing.discard(hold)
                logger.warning(
                    "could not renew ticket %s of conversation %r: %s",
                    hold._number,
                    hold.conversation_id,
                    reply,
                )

    # -- Redis calls

    def _unavailable_error(self, error: BaseException) -> LockStoreUnavailable:
        self._unavailable += 1
        if self._observer is not None:
            self._observer.store_error(error)
        if isinstance(error, TimeoutError | RedisTimeoutError):
            detail = f"no answer within socket_timeout={self._socket_timeout:g}s: {error or 'timed out'}"
        else:
            detail = f"{type(error).__name__}: {error}"
        return LockStoreUnavailable(
            f"lock store unavailable: {self._where} could not be used ({detail})"
        )

    async def _eval(self, script: scripts.LuaScript, keys: ConversationKeys, *args: Any) -> Any:
        """Run ``script`` on a conversation's keys, bounded by ``socket_timeout``."""
        try:
            if self._one_server:
                # redis-py bounds the connect and every read and write by
                # socket_timeout, and one server means one of each: no outer
                # timer is needed on the hot path.
                return await self._run(script, keys, args)
            # Sentinel asks each sentinel in turn and a cluster may walk its
            # nodes: only an outer timer bounds the whole call.
            async with asyncio.timeout(self._socket_timeout):
                return await self._run(script, keys, args)
        except (RedisError, OSError, TimeoutError) as error:
            raise self._unavailable_error(error) from error

    async def _run(self, script: scripts.LuaScript, keys: ConversationKeys, args: tuple[Any, ...]) -> Any:
        client = self._client
        try:
            return await client.execute_command(
                "EVALSHA", script.sha, 1, keys.state, *args
            )
        except NoScriptError:
            # A restarted or failed-over server forgot our scripts. (As one
            # word, "SCRIPT LOAD" goes to every node of a cluster.)
            await client.execute_command("SCRIPT LOAD", script.source)
            return await client.execute_command(
                "EVALSHA", script.sha, 1, keys.state, *args
            )

    async def _blpop(self, key: str, timeout: float) -> bytes | None:
        """Wait up to ``timeout`` seconds for a push on ``key``; the value pushed, or None."""
        try:
            async with asyncio.timeout(timeout + self._socket_timeout):
                reply = await self._client.execute_command("BLPOP", key, f"{timeout:.3f}")
        except (RedisError, OSError, TimeoutError) as error:
            raise self._unavailable_error(error) from error
        if reply is None:
            return None
        value = reply[1]
        return value if isinstance(value, bytes) else str(value).encode()

    async def _pipeline(
        self, script: scripts.LuaScript, calls: Sequence[tuple[ConversationKeys, Sequence[Any]]]
    ) -> list[Any]:
        """Run ``script`` once per call in one pipeline; per-call errors are returned, not raised."""
        if not calls:
            return []
        client = self._client
        try:
            async with asyncio.timeout(self._socket_timeout):
                for attempt in range(2):
                    pipe = client.pipeline(transaction=False)
                    for keys, args in calls:
                        pipe.execute_command(
                            "EVALSHA", script.sha, 1, keys.state, *args
                        )
                    replies: list[Any] = await pipe.execute(raise_on_error=False)
                    if attempt == 0 and any(isinstance(reply, NoScriptError) for reply in replies):
                        await client.execute_command("SCRIPT LOAD", script.source)
                        continue
                    return replies
        except (RedisError, OSError, TimeoutError) as error:
            raise self._unavailable_error(error) from error
        raise AssertionError("unreachable")  # pragma: no cover

    # -- inspection and administration

    async def inspect(self, conversation_id: str) -> LockSnapshot | None:
        """Snapshot the queue as Redis sees it now; a lapsed holder is dropped first.

        ``expires_in`` is computed on the server's clock: the time left on
        each lease (a waiter's lease is its keep-alive).
        """
        check_conversation_id(conversation_id)
        reply = await self._eval(scripts.INSPECT, self._space.keys(conversation_id))
        if not reply:
            return None
        now_us = int(reply[-1])
        leases = [
            TicketLease(int(reply[i]), max(0.0, int(reply[i + 1]) / _US)) for i in range(0, len(reply) - 1, 2)
        ]
        # A ticket is its draw time in microseconds on the server clock.
        waiting = tuple(
            TicketLease(lease.ticket, lease.expires_in, max(0.0, (now_us - lease.ticket) / _US))
            for lease in leases[1:]
        )
        return LockSnapshot(conversation_id, leases[0], waiting)

    async def conversations(self) -> AsyncIterator[str]:
        """Conversations held or waited for, found with SCAN (never KEYS), page by page.

        Keys are read lazily, so a caller that stops early (``--limit``) stops
        the scan; memory grows with the conversations found, not with the
        keys scanned. Each batch of candidates is served first, in one
        pipeline, so a conversation whose holders all died is not reported.
        Each step of the scan is bounded by ``socket_timeout``. Close the
        iterator (``contextlib.aclosing``) when leaving it early.
        """
        keys = self._client.scan_iter(match=self._space.state_pattern(), count=1000, _type="hash")
        batch: list[str] = []
        seen: set[str] = set()
        while True:
            try:
                async with asyncio.timeout(self._socket_timeout):
                    key = await anext(keys)
            except StopAsyncIteration:
                break
            except (RedisError, OSError, TimeoutError) as error:
                raise self._unavailable_error(error) from error
            conversation_id = self._space.conversation_of(key)
            if conversation_id is None or conversation_id in seen:
                continue
            seen.add(conversation_id)
            batch.append(conversation_id)
            if len(batch) >= _SCAN_BATCH:
                for live in await self._live(batch):
                    yield live
                batch = []
        for live in await self._live(batch):
            yield live

    async def _live(self, conversation_ids: list[str]) -> list[str]:
        replies = await self._pipeline(scripts.SWEEP, [(self._space.keys(c), ()) for c in conversation_ids])
        for reply in replies:
            if isinstance(reply, Exception):
                raise self._unavailable_error(reply)
        return [c for c, reply in zip(conversation_ids, replies, strict=True) if reply == 1]

    async def force_release(self, conversation_id: str) -> int | None:
        """Revoke the holder and serve the next ticket; see :meth:`LockStore.force_release`.

        A holder in this store sees ``held.lost`` at once; one in another
        process sees it at its next renewal (within ``lifetime/3``) or
        ``ensure()``.
        """
        check_conversation_id(conversation_id)
        reply = await self._eval(scripts.FORCE_RELEASE, self._space.keys(conversation_id))
        if reply is None:
            return None
        self._forced += 1
        ticket = int(reply)
        self._mark_revoked(conversation_id, ticket)
        return ticket

    def _mark_revoked(self, conversation_id: str, ticket: int) -> None:
        if self._observer is not None:
            self._observer.revoked(conversation_id, ticket, holder=True)
        for hold in list(self._renewing):
            if hold.conversation_id == conversation_id and hold._number == ticket:
                hold._revoked = True
                self._renewing.discard(hold)

    async def revoke(self, conversation_id: str, ticket: int | None = None) -> tuple[int, bool] | None:
        """Revoke the holder, or ``ticket`` if it holds or waits, in one script; see :meth:`LockStore.revoke`.

        A revoked holder in another process sees ``held.lost`` at its next
        renewal or ``ensure()``, and its fenced writes are refused once the
        next holder has loaded. A revoked waiter is told through its
        wake-up list at once (or at its next re-check) and raises
        ``LockLostError``.
        """
        check_conversation_id(conversation_id)
        if ticket is not None and (isinstance(ticket, bool) or not isinstance(ticket, int) or ticket < 1):
            raise ValueError(f"ticket must be a positive whole number, got {ticket!r}")
        reply = await self._eval(
            scripts.REVOKE, self._space.keys(conversation_id), "" if ticket is None else str(ticket)
        )
        if not reply:
            return None
        revoked, holder = int(reply[0]), reply[1] == 1
        self._forced += 1
        if holder:
            self._mark_revoked(conversation_id, revoked)
        elif self._observer is not None:
            self._observer.revoked(conversation_id, revoked, holder=False)
        return revoked, holder

    async def ping(self) -> None:
        """Check that Redis answers within ``socket_timeout``; raise ``LockStoreUnavailable`` if not."""
        try:
            async with asyncio.timeout(self._socket_timeout):
                await self._client.execute_command("PING")
        except (RedisError, OSError, TimeoutError) as error:
            raise self._unavailable_error(error) from error

    async def aclose(self) -> None:
        """Stop renewing, finish pending withdrawals, close an owned client.

        Locks still held are not released; without renewal their leases end
        within ``lifetime``. Idempotent.
        """
        self._closed = True
        renewer, self._renewer = self._renewer, None
        if renewer is not None and not renewer.done():
            renewer.cancel()
            try:
                await renewer
            except asyncio.CancelledError:
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    raise
        if self._background:
            await asyncio.wait(set(self._background), timeout=self._socket_timeout * 2)
        if self._owns_client:
            await self._client.aclose()

    def statistics(self) -> Mapping[str, Any]:
        """Counters since creation; ``held_renewing`` is the number of holds being renewed now."""
        return {
            "backend": "redis",
            "target": self._where,
            "key_prefix": self._space.prefix,
            "held_renewing": len(self._renewing),
            "acquires_contended": self._contended,
            "wakeups": self._wakeups,
            "rechecks": self._rechecks,
            "requeued": self._requeued,
            "wait_timeouts": self._timeouts,
            "cancelled_waits": self._cancelled,
            "renewals": self._renewals,
            "renewal_errors": self._renewal_errors,
            "lost": self._lost,
            "release_failures": self._release_failures,
            "force_releases": self._forced,
            "unavailable_errors": self._unavailable,
            "pending_withdrawals": len(self._background),
        }


def _may_have_run(error: LockStoreUnavailable) -> bool:
    """Whether the call that raised ``error`` may have run on the server (its reply timed out)."""
    return isinstance(error.__cause__, TimeoutError | RedisTimeoutError)


def _client_socket_timeout(client: RedisClient) -> float | None:
    if isinstance(client, RedisCluster):
        value = client.get_connection_kwargs().get("socket_timeout")
    else:
        value = client.connection_pool.connection_kwargs.get("socket_timeout")
    return float(value) if isinstance(value, int | float) and value > 0 else None


def _describe_client(client: RedisClient) -> str:
    """Name a client's server(s) for error messages, without credentials."""
    if isinstance(client, RedisCluster):
        nodes = ", ".join(node.name for node in client.get_nodes()) or "(no nodes known yet)"
        return f"Redis Cluster via {nodes}"
    kwargs = client.connection_pool.connection_kwargs
    service = getattr(client.connection_pool, "service_name", None)
    if service is not None:
        return f"Redis Sentinel service {service!r}"
    host, port = kwargs.get("host", "localhost"), kwargs.get("port", 6379)
    if "path" in kwargs:
        return f"Redis at unix:{kwargs['path']}"
    return f"Redis at {host}:{port} (db {kwargs.get('db', 0)})"
