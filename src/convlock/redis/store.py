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

Waiting: in-process first, then Redis
-------------------------------------
The store keeps, per conversation with a call in flight, its own holds and
waiters (``_Local``). A release here tells the release script this store's
tag (the random prefix of its draw IDs); when the ticket it promotes is one
of ours, the script does not push and its reply names that ticket, and the
store resolves the waiter in-process: a hand-off between two tasks of one
process costs no round trip beyond the release itself.

Only a waiter whose predecessor lives in another process needs Redis to wake
it. Of one conversation's local waiters only the first can be next, and
only while no local hold is ahead of it, so the store asks the wake-up hub
(:mod:`convlock.redis.wakeups`) to watch at most one wake-up list per
conversation, and the hub reads many lists per blocking connection. A
script that grants a ticket of another process pushes to that ticket's own
list, ``P:{conv}:w:<ticket>``, so only that waiter wakes, and the grant is
done before it wakes: hand-off costs no further round trip. The ticket then
first in the queue is pushed a re-plan notice with the new holder's lease.

Connections: short commands take a slot of a budget of
``max_connections`` minus the readers' budget (:mod:`convlock.redis.commands`),
waiting for one at most ``socket_timeout``; readers have their own budget.
So a process never opens more than ``max_connections`` connections to a
server, whatever the number of waiters, and waiting never starves draws,
releases and renewals.

Timers follow the queue as it is now: each first local waiter re-checks
(``check`` script) when the holder's lease ends, as the latest reply (or
re-plan push) reports it, and waiters' own leases are kept alive, with the
holders', by the store's one renewal task in one pipeline. A wake-up lost
(or a waiter no reader could take, past the budget) costs latency, never a
grant: the waiter re-checks at the holder's lease end, or every
``FALLBACK_POLL`` seconds when no reader watches it. Every wait is bounded
on the client's clock, so nothing depends on Redis's 100 ms timer tick.

A promoted ticket of another process keeps its waiting lease's end rather
than starting a fresh one: a waiter that died is skipped once that lease
lapses, while a live one renews in full as soon as it wakes.

Leases and renewal
------------------
A granted ticket's lease is ``lifetime`` from its grant (for a ticket
promoted by another process: from its last keep-alive, see above). Holders
with ``renew=True`` and all waiters are renewed by *one* task per store,
which renews every lease that is due in one pipeline, each at least every
``lifetime/3``. A hold learns it is lost (``held.lost``) when a renewal
says so, when this store revokes it (``force_release``), or when its local
deadline passes: the lease was granted no earlier than the request that
saw it, so ``request sent + lifetime`` (on the local monotonic clock) is a
safe bound even when renewals cannot reach Redis. Lease lengths are
bounded (:data:`~convlock.tickets.MIN_LIFETIME` to
:data:`~convlock.tickets.MAX_LIFETIME`), and the scripts check them again
before writing, so no key is ever left without a TTL.

Failures
--------
Every Redis call is bounded by ``socket_timeout`` on the client's clock, the
wait for a connection included, and is never re-sent after it may have run,
even on a client passed in with a retrying policy (see
:mod:`convlock.redis.commands`). Connection errors, timeouts and error
replies become :class:`~convlock.LockStoreUnavailable` naming the server.
After Redis comes back, the pool reconnects on the next call.

A waiter that is cancelled withdraws its ticket in a background task (so
cancellation takes effect at once and the withdrawal still happens), by
number, or by draw ID when it was cancelled before the draw's reply came
back; the store's ``aclose()`` waits for those. A release that cannot reach
Redis is logged and counted, not raised: the work is done, and the lease
lets the next ticket in within ``lifetime``.

Operations
----------
Every lock event goes to the store's observer when it has one
(:mod:`convlock.observe`; metrics and logs hang off it); each call sits
beside a round trip or an in-process hand-off. ``revoke()`` runs the
``revoke`` script: the holder is revoked as by ``force_release()``, or only
if it still holds the ticket named; a waiting ticket leaves the queue and
its wake-up list receives ``scripts.REVOKED_MARK`` instead of a grant, so
its waiter raises ``LockLostError`` at once if a reader watches it, else at
its next ``check`` (within ``lifetime/3``), which answers -2.
``conversations()`` pages through ``SCAN``.

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
import bisect
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
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..config import LockStoreSettings, RedisSettings
from ..errors import LockLostError, LockStoreUnavailable, LockTimeoutError
from ..ids import check_conversation_id
from ..observe import GrantReason
from ..store import HeldLock, LockSnapshot, LockStore, TicketLease, check_seconds, entry_refusal
from ..tickets import check_lifetime, next_look, renew_interval
from . import scripts
from .commands import CommandPath, retries_on_timeout
from .companion import Companion
from .connection import STALE_CHECK_KWARGS, RedisClient, create_client, describe
from .keys import ConversationKeys, KeySpace
from .wakeups import FALLBACK_POLL, WakeupHub

__all__ = ["RedisLockStore"]

logger = logging.getLogger("convlock.redis")

_US = 1_000_000
#: How soon a renewal that could not reach Redis is tried again, as a share of the lifetime.
_RENEW_RETRY_SHARE = 0.1
_SCAN_BATCH = 200
_REVOKED = scripts.REVOKED_MARK.encode()
#: The share of ``max_connections`` that wake-up readers may use (at least one,
#: at most this many): the rest is for short commands.
_READER_SHARE = 0.2
_MAX_READERS = 16


def _reader_budget(max_connections: int) -> int:
    return max(1, min(_MAX_READERS, int(max_connections * _READER_SHARE)))


class _RedisHold(HeldLock):
    """One ``lock()`` call: its context manager, its ticket, and the ``held`` handle."""

    __slots__ = (
        "_companion",
        "_cut",
        "_deadline",
        "_draw",
        "_granted",
        "_granted_at",
        "_holder_ends",
        "_keys",
        "_lifetime",
        "_lifetime_arg",
        "_number",
        "_poll",
        "_probe_sent",
        "_released",
        "_renew",
        "_renew_at",
        "_requeue",
        "_revoked",
        "_signal",
        "_store",
        "_wait_timeout",
        "_waited_from",
        "_waiting",
        "companion_reply",
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
        companion: Companion | None = None,
    ) -> None:
        self._store = store
        self.conversation_id = conversation_id
        self._companion = companion
        #: The companion's reply from the draw, when the ticket was granted at
        #: once; None when it waited (or the lock has no companion).
        self.companion_reply: Any = None
        self._released = False
        self._keys = keys
        self._lifetime = lifetime
        self._lifetime_arg = max(scripts.MIN_LEASE_US, round(lifetime * _US))
        self._renew = renew
        self._wait_timeout = wait_timeout
        self._number = 0
        self._revoked = False
        self._deadline = -math.inf
        self._renew_at = math.inf
        # Names this hold's draw in Redis, so that a ticket whose number never
        # reached us (cancelled or timed out mid-draw) can still be withdrawn.
        self._draw = f"{store._tag}{next(store._draw_count)}"
        # While waiting: what the waiter loop reads, set by hand-offs,
        # wake-up messages and renewals (see RedisLockStore._wait).
        self._waiting = False
        self._granted = False
        self._granted_at = math.nan
        self._cut = False  # revoked by an operator while it waited
        self._waited_from = 0.0
        self._requeue = False
        self._holder_ends = math.inf
        self._probe_sent = 0.0
        self._poll: float | None = None
        self._signal: asyncio.Event | None = None

    @property
    def ticket(self) -> int:
        return self._number

    @property
    def lost(self) -> bool:
        return self._revoked or time.monotonic() >= self._deadline

    @property
    def granted_at_once(self) -> bool:
        # RedisLockStore._wait() sets _waited_from: a ticket that never waited keeps 0.
        return bool(self._number) and self._waited_from == 0.0

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

    def _wake(self) -> None:
        if self._signal is not None:
            self._signal.set()

    async def __aenter__(self) -> _RedisHold:
        store = self._store
        if self._number or store._closed:
            raise entry_refusal(self.conversation_id, entered=bool(self._number))
        sent = time.monotonic()
        companion = self._companion
        try:
            if companion is None:
                reply = await store._eval(scripts.ISSUE, self._keys, self._lifetime_arg, self._draw)
            else:
                reply = await store._eval_keys(
                    companion.issue,
                    (self._keys.state, *companion.keys),
                    (self._lifetime_arg, self._draw, *companion.issue_args),
                )
                if reply[1] in (b"granted", "granted"):  # {ticket, 'granted', companion's reply}
                    self.companion_reply = reply[2] if len(reply) > 2 else None
                    reply = reply[0]
        except asyncio.CancelledError:
            # The draw may have run with its reply on the way: withdraw
            # whatever ticket it made, or it would block the conversation
            # for a whole lease.
            store._withdraw_later(self._keys, 0, draw=self._draw, conversation_id=self.conversation_id)
            raise
        except LockStoreUnavailable as error:
            if _may_have_run(error):
                store._withdraw_later(self._keys, 0, draw=self._draw, conversation_id=self.conversation_id)
            raise
        if type(reply) is int:  # granted at once: the ticket alone
            self._number = reply
            self._deadline = sent + self._lifetime
            store._hold(self)
            if store._observer is not None:
                self._granted_at = now = time.monotonic()
                store._observer.granted(self.conversation_id, reply, now - sent, "immediate")
        else:
            self._number = int(reply[0])
            await store._wait(self, int(reply[1]), sent)
        if self._renew:
            store._register(self, self._deadline - 2 * renew_interval(self._lifetime))
        return self

    async def release_with(self, args: Sequence[Any]) -> Any:
        """Release the lock with the companion's release script; return the companion's reply.

        The companion's last step and the release run as one script, one
        round trip; ``args`` become its ``ARGV[4..]``. The script runs even
        if the hold is known lost: the companion fences its own writes, and
        releasing a ticket that no longer holds changes nothing. Leaving the
        ``async with`` block afterwards releases nothing more.

        If the script cannot be run (``LockStoreUnavailable``, or the caller
        is cancelled), the ticket is released with plain RELEASE in the
        background and the error is raised: the companion's step may or may
        not have run.
        """
        companion = self._companion
        if companion is None or not self._number or self._released:
            raise RuntimeError("release_with() needs a lock with a companion, held and not yet released")
        store = self._store
        self._leave()
        sent = time.monotonic()
        try:
            released, *value = await store._eval_keys(
                companion.release,
                (self._keys.state, *companion.keys),
                (self._number, 0, store._tag, *args),
            )
        except BaseException as error:
            # RELEASE is idempotent, the companion's step may not be: only
            # the release is tried again, out of the caller's reach.
            if isinstance(error, LockStoreUnavailable):
                store._release_failures += 1
            store._withdraw_later(self._keys, self._number, conversation_id=self.conversation_id)
            raise
        finally:
            self._deadline = -math.inf
        if type(released) is not int:
            store._handed(self.conversation_id, released, sent)
        return value[0] if value else None

    def _leave(self) -> None:
        """Stop renewing and counting this hold: it is being released."""
        store = self._store
        self._released = True
        store._renewing.discard(self)
        store._unhold(self)
        if store._observer is not None and not math.isnan(self._granted_at):
            store._observer.released(self.conversation_id, self._number, time.monotonic() - self._granted_at)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._released:
            return  # release_with() did it
        store = self._store
        self._leave()
        if self._revoked:
            # A renewal, ensure() or force_release saw it revoked: nothing
            # to release, but our waiters no longer have a local hold ahead.
            store._rearrange(self.conversation_id)
            return
        sent = time.monotonic()
        try:
            reply = await store._eval(scripts.RELEASE, self._keys, self._number, 0, store._tag)
        except asyncio.CancelledError:
            # The script may or may not have run; it is idempotent, so run it
            # again where no cancellation can reach it.
            store._withdraw_later(self._keys, self._number, conversation_id=self.conversation_id)
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
            store._rearrange(self.conversation_id)
        else:
            if type(reply) is not int:
                store._handed(self.conversation_id, reply, sent)
        finally:
            self._deadline = -math.inf


class _Local:
    """This store's calls in flight on one conversation: its holds and its waiters.

    ``waiters`` is sorted by ticket; only ``waiters[0]`` can be served next
    among them, and ``listening`` is the waiter whose wake-up list the hub
    reads (None while a local hold is ahead, which hands over in-process).
    """

    __slots__ = ("holds", "listening", "waiters")

    def __init__(self) -> None:
        self.holds: set[_RedisHold] = set()
        self.waiters: list[_RedisHold] = []
        self.listening: _RedisHold | None = None


class RedisLockStore(LockStore):
    """Per-conversation FIFO ticket locks in Redis, shared by every process that uses it.

    Construct it from settings (``RedisLockStore.from_settings(settings)``,
    which the ``lock_store:`` block with ``type: redis`` does), or directly::

        RedisLockStore("redis://127.0.0.1:6380/0", key_prefix="app", lifetime=30)
        RedisLockStore(RedisSettings(url="redis.internal", use_ssl=True))
        RedisLockStore(existing_client)  # a redis.asyncio Redis or RedisCluster

    A store built from settings or a URL owns its client and closes it in
    :meth:`aclose`; a client passed in is left open. A client passed in gets
    the same discipline as the store's own: every call is bounded by the
    store's ``socket_timeout`` and never re-sent (a Cluster client whose
    retry policy would re-send is refused with ``ValueError``).

    Promises, across all processes and hosts sharing the Redis and the
    ``key_prefix``:

    * Mutual exclusion while leases hold: at most one live ticket per
      conversation is granted. A holder that stops renewing (crash, hang,
      ``renew=False`` past ``lifetime``) loses the lock when its lease ends.
    * Fairness: tickets are granted strictly in ticket order; a waiter whose
      process died is skipped once its waiting lease (renewed while it
      waits) ends, even if it reached the front before that.
    * Fencing: ``held.ticket`` strictly increases per conversation, even after
      the conversation went idle and its keys were deleted.
    * Hand-off: a release resolves the next waiter in-process when it is
      in this process, and otherwise wakes exactly that waiter; a waiter
      behind a holder that died is served within a few milliseconds of that
      holder's lease end.
    * Cancellation or ``wait_timeout`` withdraws the waiter's ticket; a
      ``wait_timeout`` is kept on the client's clock.
    * Bounded resources: at most ``max_connections`` connections per server,
      whatever the number of waiting calls; calls wait (up to
      ``socket_timeout``) for a connection rather than fail.
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
        max_connections: int | None = None,
    ) -> None:
        super().__init__(lifetime=lifetime, wait_timeout=wait_timeout)
        check_lifetime(self.lifetime)
        timeout = check_seconds("socket_timeout", socket_timeout)
        if max_connections is not None and (
            isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 2
        ):
            raise ValueError(f"max_connections must be a whole number of 2 or more, got {max_connections!r}")
        if redis is None:
            redis = RedisSettings()
        if isinstance(redis, RedisSettings):
            update: dict[str, Any] = {}
            if timeout is not None and timeout != redis.socket_timeout:
                update["socket_timeout"] = timeout
            if max_connections is not None:
                update["max_connections"] = max_connections
            if update:
                redis = redis.model_copy(update=update)
            # Every call is bounded by CommandPath's timer (and the readers'
            # own), so the sockets need none: redis-py then writes without
            # wrapping each write in a task.
            self._client: RedisClient = create_client(redis, retries=0, caller_bounds_reads=True)
            self._owns_client = True
            self._where = describe(redis)
            self._settings: RedisSettings | None = redis
            self._socket_timeout = redis.socket_timeout
            limit = redis.max_connections
            prefix = redis.key_prefix if key_prefix is None else key_prefix
        elif isinstance(redis, str):
            self._socket_timeout = timeout or RedisSettings().socket_timeout
            limit = max_connections or RedisSettings().max_connections
            self._client = aioredis.Redis.from_url(
                redis,
                socket_timeout=None,  # bounded by CommandPath, as above
                socket_connect_timeout=self._socket_timeout,
                retry=Retry(NoBackoff(), 0),
                max_connections=limit,
                **STALE_CHECK_KWARGS,
            )
            self._owns_client = True
            self._where = _describe_client(self._client)
            prefix = key_prefix or "convlock"
            self._settings = None
        elif isinstance(redis, aioredis.Redis | RedisCluster):
            if retries_on_timeout(redis):
                raise ValueError(
                    "RedisLockStore needs a Cluster client that never re-sends a command (a lock script "
                    "that timed out may have run): build it with retry=Retry(NoBackoff(), 0), or pass "
                    "RedisSettings and let the store build its own"
                )
            self._client = redis
            self._owns_client = False
            self._where = _describe_client(redis)
            self._settings = None
            self._socket_timeout = timeout or _client_socket_timeout(redis) or RedisSettings().socket_timeout
            limit = max_connections or RedisSettings().max_connections
            prefix = key_prefix or "convlock"
        else:
            raise TypeError(
                "RedisLockStore takes RedisSettings, a redis:// URL or a redis.asyncio client, "
                f"got {type(redis).__name__}"
            )
        self._space = KeySpace(prefix)
        self._max_connections = limit
        readers = _reader_budget(limit)
        self._commands = CommandPath(self._client, budget=limit - readers, timeout=self._socket_timeout)
        # The random prefix of this store's draw IDs: scripts recognise this
        # store's tickets by it and leave their hand-off to us (no push).
        self._tag = os.urandom(6).hex() + ":"
        self._draw_count = itertools.count(1)
        self._hub = WakeupHub(
            self._client, self._commands, prefix=prefix, budget=readers, dispatch=self._dispatch
        )
        self._closed = False
        self._local: dict[str, _Local] = {}
        self._by_wake: dict[str, _RedisHold] = {}
        self._renewing: set[_RedisHold] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._renewer_target = math.inf
        self._renewer_poke: asyncio.Event | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # Counters for statistics(); bumped off the uncontended path.
        self._contended = 0
        self._wakeups = 0
        self._local_handoffs = 0
        self._rechecks = 0
        self._fallback_waits = 0
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
    def settings(self) -> RedisSettings | None:
        """The connection settings this store was built from; None for a URL or a client passed in."""
        return self._settings

    @property
    def key_prefix(self) -> str:
        """The prefix of every key this store writes."""
        return self._space.prefix

    @property
    def max_connections(self) -> int:
        """The most connections this store opens to one Redis server."""
        return self._max_connections

    # -- the lock

    def lock(
        self,
        conversation_id: str,
        *,
        lifetime: float | None = None,
        wait_timeout: float | None = None,
        renew: bool = True,
        companion: Companion | None = None,
    ) -> _RedisHold:
        """Draw a ticket for ``conversation_id``; see :meth:`LockStore.lock` for the promises.

        In Redis the lease is on the server's clock and ``lifetime`` must be
        from 10 ms to 30 days (``ValueError`` otherwise). With
        ``renew=True`` this store's renewal task extends it every
        ``lifetime/3``; a waiting ticket's lease is renewed while it waits
        whatever ``renew`` says. Raises ``LockStoreUnavailable`` (nothing
        held) when Redis cannot be reached within ``socket_timeout``.

        ``companion`` (:mod:`convlock.redis.companion`) runs its first step in
        the draw's script when the ticket is granted at once (its reply in
        ``held.companion_reply``) and its last step in the release's script,
        through ``await held.release_with(args)``: two round trips in all for
        an uncontended lock and the work done under it.
        """
        check_conversation_id(conversation_id)
        return _RedisHold(
            self,
            conversation_id,
            keys=self._space.keys(conversation_id),
            lifetime=(
                self.lifetime
                if lifetime is None
                else check_lifetime(check_seconds("lifetime", lifetime) or 0.0)
            ),
            renew=bool(renew),
            wait_timeout=(
                self.wait_timeout if wait_timeout is None else check_seconds("wait_timeout", wait_timeout)
            ),
            companion=companion,
        )

    # -- this process's holds and waiters

    def _hold(self, hold: _RedisHold) -> None:
        local = self._local.get(hold.conversation_id)
        if local is None:
            local = self._local[hold.conversation_id] = _Local()
        local.holds.add(hold)

    def _unhold(self, hold: _RedisHold) -> None:
        local = self._local.get(hold.conversation_id)
        if local is None:
            return
        local.holds.discard(hold)
        if not local.holds and not local.waiters:
            del self._local[hold.conversation_id]

    def _rearrange(self, conversation_id: str) -> None:
        local = self._local.get(conversation_id)
        if local is not None:
            self._arrange(conversation_id, local)

    def _enqueue(self, hold: _RedisHold) -> _Local:
        local = self._local.get(hold.conversation_id)
        if local is None:
            local = self._local[hold.conversation_id] = _Local()
        hold._waiting = True
        bisect.insort(local.waiters, hold, key=_ticket_of)
        self._by_wake[hold._keys.wake(hold._number)] = hold
        self._arrange(hold.conversation_id, local)
        return local

    def _dequeue(self, hold: _RedisHold) -> None:
        """Take ``hold`` out of the waiters (granted, withdrawn or given up)."""
        if not hold._waiting:
            return
        hold._waiting = False
        self._renewing.discard(hold)
        wake = hold._keys.wake(hold._number)
        if self._by_wake.get(wake) is hold:
            del self._by_wake[wake]
        local = self._local.get(hold.conversation_id)
        if local is None:
            return
        if hold in local.waiters:
            local.waiters.remove(hold)
        if local.listening is hold:
            self._hub.unwatch(wake)
            local.listening = None
        if not local.holds and not local.waiters:
            del self._local[hold.conversation_id]
        else:
            self._arrange(hold.conversation_id, local)

    def _arrange(self, conversation_id: str, local: _Local) -> None:
        """Make the hub watch the first local waiter's list iff no local hold is ahead of it."""
        front = local.waiters[0] if local.waiters and not local.holds else None
        if front is local.listening:
            return
        if local.listening is not None:
            self._hub.unwatch(local.listening._keys.wake(local.listening._number))
            local.listening._poll = None
        local.listening = front
        if front is not None:
            watched = self._hub.watch(front._keys.wake(front._number), front._keys.tag)
            front._poll = None if watched else FALLBACK_POLL
            if not watched:
                self._fallback_waits += 1
            front._wake()

    def _grant(self, hold: _RedisHold, deadline: float, reason: GrantReason) -> None:
        """Hand the lock to a waiting ``hold`` of this process; its lease ends at ``deadline`` or later."""
        if not hold._waiting:
            return
        hold._granted = True
        hold._deadline = deadline
        if self._observer is not None:
            hold._granted_at = now = time.monotonic()
            self._observer.granted(hold.conversation_id, hold._number, now - hold._waited_from, reason)
        # A hold first, then out of the queue: the re-arrangement that
        # _dequeue does then already sees a local hold ahead of the next
        # waiter, instead of watching its list (a reader, maybe a doorbell)
        # only to unwatch it at once, on every in-process hand-off.
        self._hold(hold)
        self._dequeue(hold)
        hold._wake()

    def _handed(self, conversation_id: str, reply: Sequence[Any], sent: float) -> None:
        """Act on a hand-off reply ``{result, handed, holder, lease left}`` of a script sent at ``sent``."""
        handed, holder, left_us = int(reply[1]), int(reply[2]), int(reply[3])
        local = self._local.get(conversation_id)
        if local is None:
            return
        if handed:
            for waiter in local.waiters:
                if waiter._number == handed:
                    self._local_handoffs += 1
                    # The script gave it a fresh lease after `sent`.
                    self._grant(waiter, sent + waiter._lifetime, "handoff")
                    return
            # Not waiting here any more (cancelled as it was served): its
            # withdrawal releases it.
            return
        if holder and local.waiters:
            front = local.waiters[0]
            front._holder_ends = time.monotonic() + left_us / _US
            front._wake()
        # The lock went to another process (or nobody): our first waiter
        # must now hear from Redis.
        self._arrange(conversation_id, local)

    def _dispatch(self, key: str, message: bytes) -> None:
        """A wake-up message read by the hub for list ``key``."""
        hold = self._by_wake.get(key)
        if hold is None or not hold._waiting:
            return
        if message[:1] == b"g":
            self._wakeups += 1
            # Granted after our last "not yet" (sent at _probe_sent), with its
            # waiting lease, which was renewed no earlier than that.
            self._grant(hold, hold._probe_sent + hold._lifetime, "handoff")
        elif message == _REVOKED:
            hold._cut = True
            hold._wake()
        elif message[:1] == b"r":
            try:
                left_us = int(message[1:])
            except ValueError:  # pragma: no cover - only our scripts push here
                return
            hold._holder_ends = time.monotonic() + left_us / _US
            hold._wake()

    async def _wait(self, hold: _RedisHold, holder_left_us: int, sent: float) -> None:
        """Park ``hold`` until granted; withdraw its ticket on any exit but success."""
        self._contended += 1
        keys = hold._keys
        observer = self._observer
        if observer is not None:
            observer.waiting(hold.conversation_id, hold._number)
        hold._waited_from = sent
        deadline = None if hold._wait_timeout is None else sent + hold._wait_timeout
        hold._signal = asyncio.Event()
        hold._probe_sent = sent
        hold._holder_ends = time.monotonic() + holder_left_us / _US
        self._enqueue(hold)
        # Its waiting lease is kept alive by the renewal task, with the holds'.
        self._register(hold, sent + renew_interval(hold._lifetime))
        reissuing = False
        try:
            while not hold._granted:
                if hold._cut:
                    self._dequeue(hold)
                    raise LockLostError(
                        f"ticket {hold._number} of conversation {hold.conversation_id!r} was revoked by "
                        "an operator before it was served",
                        conversation_id=hold.conversation_id,
                    )
                if hold._requeue:
                    # Our waiting lease lapsed (this process stalled past it):
                    # we lost our place, so queue again at the back.
                    hold._requeue = False
                    self._requeued += 1
                    self._dequeue(hold)
                    reissued = time.monotonic()
                    reissuing = True
                    reply = await self._eval(scripts.ISSUE, keys, hold._lifetime_arg, hold._draw)
                    reissuing = False
                    if type(reply) is int:
                        hold._number = reply
                        hold._deadline = reissued + hold._lifetime
                        self._hold(hold)
                        if observer is not None:
                            hold._granted_at = now = time.monotonic()
                            observer.granted(hold.conversation_id, reply, now - sent, "recheck")
                        break
                    hold._number = int(reply[0])
                    hold._probe_sent = reissued
                    hold._holder_ends = time.monotonic() + int(reply[1]) / _US
                    self._enqueue(hold)
                    self._register(hold, reissued + renew_interval(hold._lifetime))
                    continue
                local = self._local.get(hold.conversation_id)
                front = local is not None and local.waiters and local.waiters[0] is hold
                # A renewing hold of ours hands over itself when it ends; any
                # other holder's lease end is when to look.
                ahead_is_local = local is not None and any(h._renew and not h.lost for h in local.holds)
                now = time.monotonic()
                # The last look is ours or the renewer's check, whichever came last.
                at = next_look(
                    now,
                    holder_ends=hold._holder_ends if front and not ahead_is_local else math.inf,
                    deadline=deadline,
                    poll=hold._poll if front else None,
                    last_look=hold._probe_sent,
                )
                if at > now:
                    hold._signal.clear()
                    if at == math.inf:
                        await hold._signal.wait()
                    else:
                        try:
                            async with asyncio.timeout(at - now):
                                await hold._signal.wait()
                        except TimeoutError:
                            pass
                    continue
                if deadline is not None and now >= deadline:
                    await self._give_up(hold)
                await self._look(hold)
        except asyncio.CancelledError:
            self._cancelled += 1
            self._abandon(hold, draw=hold._draw if reissuing else None)
            if observer is not None:
                observer.abandoned(hold.conversation_id, hold._number, time.monotonic() - sent, "cancelled")
            raise
        except LockStoreUnavailable:
            self._abandon(hold, draw=hold._draw if reissuing else None)
            if observer is not None:
                observer.abandoned(hold.conversation_id, hold._number, time.monotonic() - sent, "error")
            raise
        except LockLostError:
            self._unhold(hold)
            if observer is not None:
                observer.abandoned(hold.conversation_id, hold._number, time.monotonic() - sent, "revoked")
            raise
        finally:
            hold._signal = None
        self._renewing.discard(hold)  # _register() below puts a renewing hold back

    async def _look(self, hold: _RedisHold) -> None:
        """A waiter's own check: served yet? (the holder's lease ended, or no reader watches it)."""
        self._rechecks += 1
        checked = time.monotonic()
        state, left_us = await self._eval(scripts.CHECK, hold._keys, hold._number)
        logger.debug(
            "conversation %r ticket %d: re-checked on its timer (%s)",
            hold.conversation_id,
            hold._number,
            {1: "granted", 0: "still waiting", -1: "its waiting lease had lapsed", -2: "revoked"}.get(
                int(state), state
            ),
            extra={"conversation_id": hold.conversation_id, "ticket": hold._number, "event": "recheck"},
        )
        self._checked(hold, int(state), int(left_us), checked)

    def _checked(self, hold: _RedisHold, state: int, left_us: int, sent: float) -> None:
        """Apply a ``check`` reply sent at ``sent`` to a waiting ``hold``."""
        if not hold._waiting:
            return
        if state == 1:
            # The grant may be older than this check (a push we have not
            # read): the lease began after the last "not yet" and has
            # left_us left as of some moment after `sent`.
            self._grant(hold, max(hold._probe_sent + hold._lifetime, sent + left_us / _US), "recheck")
        elif state == -2:
            hold._cut = True
            hold._wake()
        elif state == 0:
            hold._probe_sent = sent
            hold._holder_ends = time.monotonic() + left_us / _US
            hold._renew_at = sent + renew_interval(hold._lifetime)
        else:
            hold._requeue = True
            hold._wake()

    def _abandon(self, hold: _RedisHold, *, draw: str | None) -> None:
        """Withdraw a waiter that gives up by cancellation or error, in the background."""
        self._dequeue(hold)
        self._unhold(hold)
        self._withdraw_later(hold._keys, hold._number, draw=draw, conversation_id=hold.conversation_id)

    async def _give_up(self, hold: _RedisHold) -> NoReturn:
        """Withdraw a waiter whose ``wait_timeout`` passed and raise ``LockTimeoutError``."""
        self._timeouts += 1
        self._dequeue(hold)
        sent = time.monotonic()
        try:
            reply = await self._eval(scripts.RELEASE, hold._keys, hold._number, 1, self._tag)
        except BaseException:
            self._withdraw_later(hold._keys, hold._number, conversation_id=hold.conversation_id)
            raise
        if type(reply) is not int:
            self._handed(hold.conversation_id, reply, sent)
        if self._observer is not None:
            self._observer.timed_out(hold.conversation_id, hold._number, time.monotonic() - hold._waited_from)
        raise LockTimeoutError(
            f"waited {hold._wait_timeout:g}s for conversation {hold.conversation_id!r} without "
            f"being served (ticket {hold._number} withdrawn)",
            conversation_id=hold.conversation_id,
        )

    def _withdraw_later(
        self,
        keys: ConversationKeys,
        ticket: int,
        *,
        conversation_id: str,
        draw: str | None = None,
    ) -> None:
        """Withdraw ``ticket`` in the background, out of reach of the caller's cancellation.

        With ``draw``, withdraw instead whatever ticket that draw made, for a
        draw whose reply (the ticket's number) was lost.
        """

        async def withdraw() -> None:
            sent = time.monotonic()
            try:
                if draw is None:
                    reply = await self._eval(scripts.RELEASE, keys, ticket, 1, self._tag)
                else:
                    reply = await self._eval(scripts.WITHDRAW, keys, draw, self._tag)
            except LockStoreUnavailable as error:
                logger.warning(
                    "could not withdraw ticket %s (%s); it lapses when its lease ends",
                    ticket or f"of draw {draw}",
                    error,
                )
                return
            if type(reply) is not int:
                self._handed(conversation_id, reply, sent)

        task = asyncio.get_running_loop().create_task(withdraw())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- renewal

    def _register(self, hold: _RedisHold, renew_at: float) -> None:
        """Hand a lease (a renewing hold's, or a waiter's) to the renewal task, starting it if needed."""
        hold._renew_at = renew_at
        self._renewing.add(hold)
        renewer = self._renewer
        if renewer is None or renewer.done():
            self._renewer_poke = asyncio.Event()
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())
        elif hold._renew_at < self._renewer_target:
            assert self._renewer_poke is not None
            self._renewer_poke.set()

    async def _renew_forever(self) -> None:
        """Renew every due lease, sleeping until the next is due; runs until ``aclose``."""
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
        """Extend the leases of ``holds`` in one pipeline: ``renew`` for holders, ``check`` for waiters."""
        sent = time.monotonic()
        calls = [
            (scripts.CHECK, hold._keys.state, (hold._number,))
            if hold._waiting
            else (scripts.RENEW, hold._keys.state, (hold._number, 1))
            for hold in holds
        ]
        try:
            replies = await self._pipeline(calls)
        except LockStoreUnavailable as error:
            replies = [error] * len(holds)
        for hold, reply in zip(holds, replies, strict=True):
            if isinstance(reply, list) and hold._waiting:
                self._checked(hold, int(reply[0]), int(reply[1]), sent)
                if not hold._waiting:
                    self._renewing.discard(hold)
                    if hold._renew:
                        self._register(hold, hold._deadline - 2 * renew_interval(hold._lifetime))
                elif hold._requeue:
                    self._renewing.discard(hold)
            elif reply == 1:
                self._renewals += 1
                hold._deadline = sent + hold._lifetime
                hold._renew_at = sent + renew_interval(hold._lifetime)
            elif reply == 0:
                self._lost += 1
                hold._revoked = True
                self._renewing.discard(hold)
                if self._observer is not None:
                    self._observer.lapsed(hold.conversation_id, hold._number)
            elif not hold._waiting and not isinstance(reply, Exception) and reply is not None:
                self._renewing.discard(hold)  # a stale entry: nothing to renew
            else:
                # Try again soon; if this keeps failing, the local deadline
                # passes and the hold reports itself lost (a waiter's own
                # check then raises).
                self._renewal_errors += 1
                hold._renew_at = time.monotonic() + hold._lifetime * _RENEW_RETRY_SHARE
                if not hold._waiting and hold.lost:
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
        """Run ``script`` on a conversation's keys, bounded by ``socket_timeout``, never re-sent."""
        try:
            return await self._commands.evalsha(script, keys.state, *args)
        except (RedisError, OSError, TimeoutError) as error:
            raise self._unavailable_error(error) from error

    async def _eval_keys(self, script: scripts.LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """:meth:`_eval` with several declared keys (a companion's, in the conversation's slot)."""
        try:
            return await self._commands.evalsha_keys(script, keys, args)
        except (RedisError, OSError, TimeoutError) as error:
            raise self._unavailable_error(error) from error

    async def _pipeline(self, calls: Sequence[tuple[scripts.LuaScript, str, Sequence[Any]]]) -> list[Any]:
        """Run several scripts in one round trip; per-call errors are returned, not raised."""
        if not calls:
            return []
        try:
            return await self._commands.pipeline(calls)
        except (RedisError, OSError, TimeoutError) as error:
            raise self._unavailable_error(error) from error

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
        replies = await self._pipeline(
            [(scripts.SWEEP, self._space.keys(c).state, ()) for c in conversation_ids]
        )
        for reply in replies:
            if isinstance(reply, Exception):
                raise self._unavailable_error(reply)
        return [c for c, reply in zip(conversation_ids, replies, strict=True) if reply == 1]

    async def force_release(self, conversation_id: str) -> int | None:
        """Revoke the holder and serve the next ticket; see :meth:`LockStore.force_release`.

        Every hold of this store that it revokes sees ``held.lost`` at once,
        renewing or not; one in another process sees it at its next renewal
        (within ``lifetime/3``) or ``ensure()``.
        """
        check_conversation_id(conversation_id)
        sent = time.monotonic()
        reply = await self._eval(scripts.FORCE_RELEASE, self._space.keys(conversation_id), self._tag)
        revoked = int(reply[0])
        if not revoked:
            return None
        self._forced += 1
        self._mark_revoked(conversation_id, revoked, reply, sent)
        return revoked

    def _mark_revoked(self, conversation_id: str, ticket: int, reply: Sequence[Any], sent: float) -> None:
        """A holder ``ticket`` was revoked by a script sent at ``sent`` whose hand-off ``reply`` came back."""
        if self._observer is not None:
            self._observer.revoked(conversation_id, ticket, holder=True)
        local = self._local.get(conversation_id)
        if local is None:
            return
        for hold in list(local.holds):
            if hold._number == ticket:
                hold._revoked = True
                self._renewing.discard(hold)
                local.holds.discard(hold)
        self._handed(conversation_id, reply, sent)
        if not local.holds and not local.waiters:
            self._local.pop(conversation_id, None)
        elif conversation_id in self._local:
            self._arrange(conversation_id, local)

    async def revoke(self, conversation_id: str, ticket: int | None = None) -> tuple[int, bool] | None:
        """Revoke the holder, or ``ticket`` if it holds or waits, in one script; see :meth:`LockStore.revoke`.

        A revoked holder in this store sees ``held.lost`` at once; in another
        process at its next renewal or ``ensure()``, and its fenced writes are
        refused once the next holder has loaded. A revoked waiter is told
        through its wake-up list when a reader watches it, else at its next
        check (within ``lifetime/3``), and raises ``LockLostError``.
        """
        check_conversation_id(conversation_id)
        if ticket is not None and (isinstance(ticket, bool) or not isinstance(ticket, int) or ticket < 1):
            raise ValueError(f"ticket must be a positive whole number, got {ticket!r}")
        sent = time.monotonic()
        named = "" if ticket is None else str(ticket)
        reply = await self._eval(scripts.REVOKE, self._space.keys(conversation_id), named, self._tag)
        revoked, holder = int(reply[0]), int(reply[1]) == 1
        if not revoked:
            return None
        self._forced += 1
        if holder:
            self._mark_revoked(conversation_id, revoked, [reply[0], *reply[2:]], sent)
        else:
            if self._observer is not None:
                self._observer.revoked(conversation_id, revoked, holder=False)
            local = self._local.get(conversation_id)
            for hold in local.waiters if local is not None else ():
                if hold._number == revoked:
                    hold._cut = True
                    hold._wake()
        return revoked, holder

    async def ping(self) -> None:
        """Check that Redis answers within ``socket_timeout``; raise ``LockStoreUnavailable`` if not."""
        try:
            await self._commands.call("PING")
        except (RedisError, OSError, TimeoutError) as error:
            raise self._unavailable_error(error) from error

    async def aclose(self) -> None:
        """Stop renewing and reading wake-ups, finish pending withdrawals, close an owned client.

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
        await self._hub.aclose()
        if self._background:
            _, pending = await asyncio.wait(set(self._background), timeout=self._socket_timeout * 2)
            # Redis did not answer in time: those tickets lapse with their leases.
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        # After the background releases, which use it: the pipelined
        # connection goes back to the pool (a client passed in stays usable).
        await self._commands.aclose()
        if self._owns_client:
            await self._client.aclose()

    def statistics(self) -> Mapping[str, Any]:
        """Counters since creation, and what is in flight now.

        ``held_renewing`` counts the leases being renewed now (holds and
        waiters); ``local_handoffs`` counts grants made in-process by a
        release reply; ``wakeups`` those read from Redis; ``fallback_waits``
        waiters that no reader could watch.
        """
        return {
            "backend": "redis",
            "target": self._where,
            "key_prefix": self._space.prefix,
            "max_connections": self._max_connections,
            "held_renewing": len(self._renewing),
            "conversations_in_flight": len(self._local),
            "commands_in_flight": self._commands.in_flight,
            "wakeup_readers": self._hub.readers,
            "wakeup_reads": self._hub.reads,
            "doorbells": self._hub.doorbells,
            "acquires_contended": self._contended,
            "wakeups": self._wakeups,
            "local_handoffs": self._local_handoffs,
            "rechecks": self._rechecks,
            "fallback_waits": self._fallback_waits,
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


def _ticket_of(hold: _RedisHold) -> int:
    return hold._number


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
