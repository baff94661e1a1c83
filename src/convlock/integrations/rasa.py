"""convlock as a Rasa lock store, switched on by one line of ``endpoints.yml``::

    lock_store:
      type: convlock.integrations.rasa.ConvlockLockStore
      host: redis.internal      # the keys of Rasa's `type: redis` store, unchanged
      port: 6379
      lifetime: 10              # convlock's own keys are accepted too

Design
------
Rasa loads a custom lock store by dotted path and builds it as
``Class(endpoint_config=EndpointConfig)``; Rasa Pro checks that the class
derives from ``rasa.core.lock_store.LockStore``. After that, every caller in
Rasa (agent, processor, HTTP API, reminders) uses only::

    async with lock_store.lock(conversation_id, lock_lifetime=..., wait_time_in_seconds=...):

So :class:`ConvlockLockStore` is a thin subclass: it turns the endpoint's
keys into a convlock ``lock_store:`` block, validates it with convlock's
own models (:func:`convlock.factory.create_lock_store`, so an error names
the key), and delegates :meth:`ConvlockLockStore.lock` to the convlock
store it built. ``lock`` stays an ``@asynccontextmanager`` generator, as in
Rasa, because Rasa's tracing instrumentation unwraps it as one.

Rasa's base class also has synchronous methods that read and write its
JSON ``TicketLock`` blob (``get_lock``, ``save_lock``, ``issue_ticket``, ...).
They cannot be meaningful here: convlock's state is a Redis hash changed
only by atomic scripts, reached through an asyncio client, and a
synchronous get-then-save pair is exactly the race convlock removes. Each
raises :class:`UnsupportedLockStoreOperation` naming the async call that
does the job (:meth:`~ConvlockLockStore.inspect`,
:meth:`~ConvlockLockStore.force_release`). Nothing in Rasa 3.21 calls them
outside its own ``lock()``.

Errors: convlock's lock errors are re-raised as classes that derive from
both Rasa's ``LockError`` (so Rasa handles them as it always has) and the
convlock class they came from (so ``except LockTimeoutError`` still works).

Rasa is not a dependency of convlock: this module imports Rasa's classes
when it is loaded, and fails with a message that says what to install.

Open questions: Rasa's tracker-store writes are not fenced with the ticket,
so a holder whose lease lapsed (a stalled process) can still write a stale
tracker; the yielded lock carries the ticket for a store that wants to
check it.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

try:
    from rasa.core.lock import Ticket, TicketLock
    from rasa.core.lock_store import LockError as RasaLockError
    from rasa.core.lock_store import LockStore as RasaLockStore
except ImportError as exc:
    raise ImportError(
        "convlock.integrations.rasa is the lock store for Rasa deployments and needs Rasa, "
        f"which cannot be imported here ({exc}). Install Rasa Pro 3.21 or newer next to convlock "
        "(pip install 'rasa-pro>=3.21' convlock); convlock itself does not depend on Rasa.",
        name=exc.name,
    ) from exc

from ..config import describe
from ..errors import ConfigError, LockError, LockLostError, LockStoreUnavailable, LockTimeoutError
from ..factory import create_lock_store
from ..store import HeldLock, LockSnapshot, LockStore

__all__ = [
    "BACKENDS",
    "ConvlockLockStore",
    "HeldTicketLock",
    "RasaLockLostError",
    "RasaLockStoreUnavailable",
    "RasaLockTimeoutError",
    "RasaWrappedLockError",
    "UnsupportedLockStoreOperation",
    "lock_store_config",
]

logger = logging.getLogger("convlock.integrations.rasa")

#: Values of the ``backend`` key: ``redis`` (the default) for replicas,
#: ``in_memory`` for a single process.
BACKENDS = ("redis", "in_memory")

SECTION = "lock_store"
SANIC_WORKERS_ENV = "SANIC_WORKERS"  # how many processes a Rasa server runs


# -- errors


class RasaWrappedLockError(RasaLockError, LockError):
    """A convlock :class:`~convlock.LockError` as Rasa sees it: also a ``rasa.core.lock_store.LockError``.

    ``conversation_id`` names the conversation, as on every convlock lock error.
    """

    def __init__(self, message: str, *, conversation_id: str | None = None) -> None:
        # RasaException.__init__ does not call super().__init__, so set ours by hand.
        RasaLockError.__init__(self, message)
        self.conversation_id = conversation_id


class RasaLockTimeoutError(RasaWrappedLockError, LockTimeoutError):
    """convlock's :class:`~convlock.LockTimeoutError` (``wait_timeout`` passed), as a Rasa ``LockError``."""


class RasaLockLostError(RasaWrappedLockError, LockLostError):
    """convlock's :class:`~convlock.LockLostError`, as a Rasa ``LockError``."""


class RasaLockStoreUnavailable(RasaWrappedLockError, LockStoreUnavailable):
    """convlock's :class:`~convlock.LockStoreUnavailable` (Redis unreachable), as a Rasa ``LockError``."""


def as_rasa_error(error: LockError) -> RasaWrappedLockError:
    """The Rasa-catchable twin of a convlock lock error, with the same message and conversation."""
    if isinstance(error, RasaWrappedLockError):
        return error
    cls: type[RasaWrappedLockError] = RasaWrappedLockError
    for convlock_class, rasa_class in (
        (LockTimeoutError, RasaLockTimeoutError),
        (LockLostError, RasaLockLostError),
        (LockStoreUnavailable, RasaLockStoreUnavailable),
    ):
        if isinstance(error, convlock_class):
            cls = rasa_class
            break
    return cls(str(error), conversation_id=error.conversation_id)


class UnsupportedLockStoreOperation(NotImplementedError):
    """A Rasa ``LockStore`` method that only makes sense for Rasa's JSON ``TicketLock`` blob.

    The message says why, and which call of :class:`ConvlockLockStore` does the job.
    """


# -- configuration


def lock_store_config(endpoint_config: Any) -> dict[str, Any]:
    """Turn Rasa's ``EndpointConfig`` for ``lock_store:`` into a convlock ``lock_store:`` block.

    Takes the keys of Rasa's ``redis`` lock store (``host``, the deprecated
    ``url``, ``port``, ``db``, ``username``, ``password``, ``use_ssl``,
    ``ssl_*``, ``key_prefix``, ``socket_timeout``, ``deployment_mode``,
    ``endpoints``, ``sentinel_service``), convlock's ``lifetime`` and
    ``wait_timeout``, and ``backend`` (:data:`BACKENDS`), which becomes
    convlock's ``type``. Raises :class:`~convlock.ConfigError` naming
    ``lock_store.backend`` for an unknown backend, or for ``in_memory``
    while ``SANIC_WORKERS`` asks Rasa for several processes; the other keys
    are checked when the store is built.
    """
    if endpoint_config is None:
        keys: dict[str, Any] = {}
    else:
        # EndpointConfig keeps `url` as an attribute (it is an HTTP endpoint's
        # main key) and every other key in `kwargs`.
        keys = dict(getattr(endpoint_config, "kwargs", None) or {})
        url = getattr(endpoint_config, "url", None)
        if url is not None:
            keys["url"] = url
    backend = keys.pop("backend", None)
    backend = "redis" if backend is None else str(backend).strip()
    if backend not in BACKENDS:
        raise ConfigError(
            f"invalid {SECTION} configuration: {SECTION}.backend: got {describe(backend)}; "
            "use 'redis' (replicas sharing a Redis, the default) or 'in_memory' (one process only). "
            "Fix this key in endpoints.yml."
        )
    workers = os.environ.get(SANIC_WORKERS_ENV, "").strip()
    if backend == "in_memory" and workers.isdigit() and int(workers) > 1:
        # Rasa lets a custom store run with several workers; in-memory locks
        # would then be per process and exclude nothing.
        raise ConfigError(
            f"invalid {SECTION} configuration: {SECTION}.backend: got 'in_memory' with "
            f"{SANIC_WORKERS_ENV}={workers}; in-memory locks hold within one process only, so use "
            f"'redis' or run one worker. Fix this key in endpoints.yml."
        )
    keys["type"] = backend
    return keys


# -- what lock() yields


class _HeldTicket(Ticket):
    """Rasa's ``Ticket`` view of a convlock hold: never expires while held, expired once lost.

    The lease is renewed while held, so there is no fixed expiry to show.
    """

    def __init__(self, held: HeldLock) -> None:
        # Ticket.__init__ would assign `expires`, which is computed here.
        self.number = held.ticket
        self._held = held

    @property
    def expires(self) -> float:
        """``inf`` while the hold is live, ``0.0`` once it is known lost."""
        return 0.0 if self._held.lost else math.inf


class HeldTicketLock(TicketLock):
    """What ``async with store.lock(...)`` yields: Rasa's ``TicketLock`` view of the hold.

    As in Rasa, ``lock.now_serving`` is the held ticket and
    ``lock.is_locked(ticket)`` is false for it, until the hold is lost.
    ``held`` is convlock's :class:`~convlock.HeldLock`: ``ticket`` is the
    fencing token (it strictly increases per conversation), ``lost`` a cheap
    local check, and ``await ensure()`` raises a Rasa ``LockError`` (also
    convlock's ``LockLostError``) when the lock is no longer held.
    """

    def __init__(self, held: HeldLock) -> None:
        super().__init__(held.conversation_id, deque([_HeldTicket(held)]))
        self.held = held

    @property
    def ticket(self) -> int:
        """The fencing token of this hold."""
        return self.held.ticket

    @property
    def lost(self) -> bool:
        """True once this holder is known to hold the lock no longer."""
        return self.held.lost

    async def ensure(self) -> None:
        """Raise :class:`RasaLockLostError` unless the lock is still held."""
        try:
            await self.held.ensure()
        except LockError as error:
            raise as_rasa_error(error) from error


# -- the store


class ConvlockLockStore(RasaLockStore):
    """A Rasa ``LockStore`` backed by convlock: FIFO ticket locks with no polling and no lost updates.

    Rasa builds it from ``endpoints.yml`` (``type:
    convlock.integrations.rasa.ConvlockLockStore``) as
    ``ConvlockLockStore(endpoint_config=...)``. The keys are those of Rasa's
    ``redis`` lock store plus convlock's ``lifetime`` and ``wait_timeout``,
    and ``backend: in_memory`` for a single process (default ``redis``);
    every value is validated by convlock's models, and a bad one raises
    :class:`~convlock.ConfigError` naming ``lock_store.<key>``. Code may
    instead wrap a convlock store it built itself: ``ConvlockLockStore(store=...)``.

    Promises are the wrapped store's (see :class:`convlock.LockStore`): at
    most one holder per conversation across every replica sharing the
    Redis, tickets served strictly in the order drawn, leases renewed while
    held, an idle conversation leaves no keys.
    """

    def __init__(self, endpoint_config: Any = None, *, store: LockStore | None = None) -> None:
        if store is not None and endpoint_config is not None:
            raise ValueError("give either endpoint_config or store, not both")
        #: The convlock store that does the locking.
        self.store: LockStore = (
            store if store is not None else create_lock_store(lock_store_config(endpoint_config))
        )
        super().__init__()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(store={type(self.store).__name__})"

    @asynccontextmanager
    async def lock(
        self,
        conversation_id: str,
        lock_lifetime: float | None = None,
        wait_time_in_seconds: float = 1,
    ) -> AsyncIterator[HeldTicketLock]:
        """Hold ``conversation_id``'s lock for the block, with Rasa's signature.

        Fairness: tickets are granted strictly in the order drawn, across
        every replica sharing the store. The wait ends when the previous
        holder releases (it hands the lock over directly), or at the latest
        when its lease lapses.

        ``lock_lifetime``: the lease, in seconds (default: the ``lifetime``
        key, else ``TICKET_LOCK_LIFETIME``, else 60). It is renewed every
        ``lifetime/3`` while the holder lives, so a long message never loses
        the lock, and it only bounds how long a crashed replica blocks the
        conversation.

        ``wait_time_in_seconds`` is accepted and ignored: convlock does not
        poll, so there is no interval between attempts to set. To bound the
        wait, set ``wait_timeout`` in ``endpoints.yml``.

        Errors: a convlock lock error (``wait_timeout`` passed, Redis
        unreachable, store closed) is raised as a Rasa ``LockError`` that is
        also the convlock class (:class:`RasaLockTimeoutError`, ...).
        Leaving the block by any exception, cancellation included, releases
        the lock. A hold found lost at release is logged as a warning.
        """
        del wait_time_in_seconds  # no polling: see the docstring
        held_context = self.store.lock(conversation_id, lifetime=lock_lifetime)
        try:
            held = await held_context.__aenter__()
        except LockError as error:
            raise as_rasa_error(error) from error
        try:
            yield HeldTicketLock(held)
        except BaseException as error:
            await self._release(held_context, held, error)
            raise
        await self._release(held_context, held, None)

    async def _release(self, context: Any, held: HeldLock, error: BaseException | None) -> None:
        lost = held.lost  # before the release, after which the hold is gone anyway
        try:
            await context.__aexit__(None if error is None else type(error), error, None)
        except LockError as release_error:
            raise as_rasa_error(release_error) from release_error
        if lost:
            logger.warning(
                "conversation %r: ticket %d's lease lapsed before Rasa finished the message, so the "
                "next message may have run alongside it; raise `lifetime` or find what blocked the "
                "event loop",
                held.conversation_id,
                held.ticket,
            )

    # -- async equivalents of the blob methods

    async def inspect(self, conversation_id: str) -> LockSnapshot | None:
        """Snapshot the conversation's queue (serving and waiting tickets), or None when idle."""
        return await self.store.inspect(conversation_id)

    async def force_release(self, conversation_id: str) -> int | None:
        """Revoke the holder and serve the next ticket; return the revoked ticket (an operator's tool)."""
        return await self.store.force_release(conversation_id)

    async def aclose(self) -> None:
        """Close the convlock store (its Redis connections and renewal task)."""
        await self.store.aclose()

    def statistics(self) -> Mapping[str, Any]:
        """The convlock store's counters."""
        return self.store.statistics()

    # -- Rasa's blob methods: not meaningful here, see the module docstring

    def _unsupported(self, method: str, instead: str) -> UnsupportedLockStoreOperation:
        return UnsupportedLockStoreOperation(
            f"{type(self).__name__}.{method}() works on Rasa's JSON TicketLock blob, which convlock does "
            "not keep: its locks live in Redis hashes changed only by atomic scripts over an asyncio "
            f"client, so a synchronous read or write of the whole lock cannot be offered. {instead}"
        )

    def get_lock(self, conversation_id: str) -> Any:
        """Unsupported: raises :class:`UnsupportedLockStoreOperation`; use ``await inspect(id)``."""
        raise self._unsupported("get_lock", "To look at a queue, use `await store.inspect(id)`.")

    def get_or_create_lock(self, conversation_id: str) -> Any:
        """Unsupported: raises :class:`UnsupportedLockStoreOperation`; use ``async with lock(id)``."""
        raise self._unsupported("get_or_create_lock", "To take a lock, use `async with store.lock(id)`.")

    def save_lock(self, lock: Any) -> None:
        """Unsupported: raises :class:`UnsupportedLockStoreOperation`; locks change only inside ``lock()``."""
        raise self._unsupported("save_lock", "Locks change only through `async with store.lock(id)`.")

    def delete_lock(self, conversation_id: str) -> None:
        """Unsupported: raises :class:`UnsupportedLockStoreOperation`; use ``await force_release(id)``."""
        raise self._unsupported(
            "delete_lock",
            "An idle conversation has no keys to delete; to free a stuck one, use "
            "`await store.force_release(id)`.",
        )

    def issue_ticket(self, conversation_id: str, lock_lifetime: float = 0) -> int:
        """Unsupported: raises :class:`UnsupportedLockStoreOperation`; use ``async with lock(id)``."""
        raise self._unsupported(
            "issue_ticket", "A ticket is drawn and served inside `async with store.lock(id)`."
        )

    def update_lock(self, conversation_id: str) -> None:
        """Unsupported: raises :class:`UnsupportedLockStoreOperation`; the store drops lapsed leases."""
        raise self._unsupported("update_lock", "Lapsed leases are dropped by the store itself.")

    def is_someone_waiting(self, conversation_id: str) -> bool:
        """Unsupported: raises :class:`UnsupportedLockStoreOperation`; use ``await inspect(id)``."""
        raise self._unsupported("is_someone_waiting", "Use `await store.inspect(id)` and its `waiting`.")

    def finish_serving(self, conversation_id: str, ticket_number: int) -> None:
        """Unsupported: raises :class:`UnsupportedLockStoreOperation`; leaving ``lock()`` releases."""
        raise self._unsupported("finish_serving", "Leaving `async with store.lock(id)` releases the ticket.")

    def cleanup(self, conversation_id: str, ticket_number: int) -> None:
        """Unsupported: raises :class:`UnsupportedLockStoreOperation`; leaving ``lock()`` releases."""
        raise self._unsupported("cleanup", "Leaving `async with store.lock(id)` releases the ticket.")

    async def _acquire_lock(self, conversation_id: str, ticket: int, wait_time_in_seconds: float) -> Any:
        """Unsupported: raises :class:`UnsupportedLockStoreOperation`; use ``async with lock(id)``."""
        raise self._unsupported("_acquire_lock", "To take a lock, use `async with store.lock(id)`.")
