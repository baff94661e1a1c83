"""The contract every lock store keeps: :class:`LockStore` and :class:`HeldLock`.

A store hands out per-conversation ticket locks::

    async with store.lock(conversation_id) as held:
        ...  # at most one holder per conversation, served in ticket order

Concrete stores (``InMemoryLockStore``, ``RedisLockStore``, or a user's class
named in ``endpoints.yml``) implement the abstract methods; the argument
checks and defaults live here so that every store treats them alike.
"""

from __future__ import annotations

import abc
import math
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from .errors import ConfigError, LockError
from .observe import LockObserver, combine

__all__ = [
    "DEFAULT_LIFETIME",
    "LIFETIME_ENV",
    "HeldLock",
    "LockSnapshot",
    "LockStore",
    "TicketLease",
    "default_lifetime",
    "entry_refusal",
]

DEFAULT_LIFETIME = 60.0
LIFETIME_ENV = "TICKET_LOCK_LIFETIME"


def default_lifetime() -> float:
    """The lease length used when neither the call nor the store names one.

    ``TICKET_LOCK_LIFETIME`` (seconds), as in the spec's framework, else 60.
    It is read when a store is created, not at import, so a process can set it
    late.
    """
    raw = os.environ.get(LIFETIME_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_LIFETIME
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(
            f"{LIFETIME_ENV}={raw!r} is not a lease length: set it to a positive "
            "number of seconds, such as 60, or unset it to use the default"
        )
    return value


def check_seconds(name: str, value: float | None, *, allow_none: bool = True) -> float | None:
    """Validate a duration argument: a positive finite number, or None."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be a positive number of seconds, got None")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number of seconds, got {value!r}")
    return float(value)


def entry_refusal(conversation_id: str, *, entered: bool) -> Exception:
    """Why a ``lock()`` context may not be entered: used again, or its store is closed."""
    if entered:
        return RuntimeError("a lock() context can be entered only once")
    return LockError("the lock store is closed", conversation_id=conversation_id)


@dataclass(frozen=True, slots=True)
class TicketLease:
    """One ticket in a snapshot.

    ``expires_in`` is the number of seconds until the lease lapses unless it
    is renewed, measured on the store's own clock, so snapshots from hosts
    with different wall clocks compare correctly. ``waited`` is how long a
    waiting ticket has waited so far (seconds since it was drawn), when the
    store knows it; None for the holder.
    """

    ticket: int
    expires_in: float
    waited: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form (``waited`` only when known)."""
        out: dict[str, Any] = {"ticket": self.ticket, "expires_in": round(self.expires_in, 6)}
        if self.waited is not None:
            out["waited"] = round(self.waited, 6)
        return out


@dataclass(frozen=True, slots=True)
class LockSnapshot:
    """What a conversation's queue looked like at one moment.

    ``serving`` is the granted ticket, or None in the instant after it lapsed
    and before the next waiter was granted. ``waiting`` lists the other live
    tickets in the order they will be served.
    """

    conversation_id: str
    serving: TicketLease | None
    waiting: tuple[TicketLease, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "conversation_id": self.conversation_id,
            "serving": None if self.serving is None else self.serving.as_dict(),
            "waiting": [lease.as_dict() for lease in self.waiting],
        }


class HeldLock(abc.ABC):
    """What ``async with store.lock(...) as held`` binds.

    ``held.ticket`` is the fencing token: it strictly increases per
    conversation, so a downstream store can refuse a write carrying a ticket
    lower than one it already applied. ``held.lost`` turns true once the lease
    lapsed or the lock was force-released; it is a cheap local check, while
    ``await held.ensure()`` asks the store and raises ``LockLostError``.
    """

    __slots__ = ()

    conversation_id: str

    @property
    @abc.abstractmethod
    def ticket(self) -> int:
        """The fencing token of this hold."""

    @property
    @abc.abstractmethod
    def lost(self) -> bool:
        """True once this holder is known to hold the lock no longer."""

    @abc.abstractmethod
    async def ensure(self) -> None:
        """Raise :class:`~convlock.LockLostError` unless the lock is still held."""

    @property
    def granted_at_once(self) -> bool:
        """True when the ticket was granted on its draw, without queueing behind another.

        False while the hold is not entered, after a wait, and for a store
        that cannot tell (this default).
        """
        return False


class LockStore(abc.ABC):
    """A source of per-conversation FIFO ticket locks.

    Subclasses implement :meth:`lock`, :meth:`inspect`, :meth:`conversations`
    and :meth:`force_release`; they may override :meth:`ping`, :meth:`aclose`
    and :meth:`statistics`. A custom store named by a dotted path in
    ``endpoints.yml`` is constructed with the remaining keys of its
    ``lock_store:`` block as keyword arguments.

    Stores are async context managers: ``async with store:`` closes them.
    """

    def __init__(self, *, lifetime: float | None = None, wait_timeout: float | None = None) -> None:
        #: Default lease length in seconds for calls that do not name one.
        self.lifetime: float = check_seconds("lifetime", lifetime) or default_lifetime()
        #: Default bound on waiting, or None to wait as long as it takes.
        self.wait_timeout: float | None = check_seconds("wait_timeout", wait_timeout)
        #: Receives lock events (see :mod:`convlock.observe`); None costs nothing.
        self._observer: LockObserver | None = None

    def add_observer(self, observer: LockObserver) -> None:
        """Send this store's lock events to ``observer`` as well (metrics, logs).

        Events of locks already held or waiting when it is added may be
        seen only in part (a release without its grant).
        """
        # getattr: a user's store may not have called LockStore.__init__.
        self._observer = combine(getattr(self, "_observer", None), observer)

    @property
    def observer(self) -> LockObserver | None:
        """The observer this store calls, or None."""
        return getattr(self, "_observer", None)

    @abc.abstractmethod
    def lock(
        self,
        conversation_id: str,
        *,
        lifetime: float | None = None,
        wait_timeout: float | None = None,
        renew: bool = True,
    ) -> AbstractAsyncContextManager[HeldLock]:
        """Draw a ticket for ``conversation_id`` and hold the lock when it is served.

        Fairness: tickets are granted strictly in the order they were drawn.

        Expiry: the lease lasts ``lifetime`` seconds (store default when None)
        from the moment the ticket is granted. With ``renew=True`` it renews
        itself at least every ``lifetime/3`` while the owner is alive; with
        ``renew=False`` a holder that runs longer than ``lifetime`` loses the
        lock to the next ticket.

        Waiting: ``wait_timeout`` (store default when None; no default means
        wait for ever) bounds the wait; past it ``LockTimeoutError`` is raised.

        Cancellation: cancelling a waiting task withdraws its ticket at once;
        leaving the block by any exception releases the lock.

        Raises ``ValueError`` at once for an invalid ``conversation_id``.
        """

    @abc.abstractmethod
    async def inspect(self, conversation_id: str) -> LockSnapshot | None:
        """Snapshot a conversation's queue, or None when nothing is held or waiting."""

    @abc.abstractmethod
    def conversations(self) -> AsyncIterator[str]:
        """Iterate over the conversations that are locked or have waiters.

        The iteration is weakly consistent: conversations locked or released
        while it runs may or may not appear.
        """

    @abc.abstractmethod
    async def force_release(self, conversation_id: str) -> int | None:
        """Revoke the current holder and serve the next ticket.

        Returns the revoked ticket, or None when nothing was held. The revoked
        holder's ``held.lost`` becomes true and its release does nothing. This
        is an operator's tool for a holder known to be stuck.
        """

    async def revoke(self, conversation_id: str, ticket: int | None = None) -> tuple[int, bool] | None:
        """Revoke the holder, or the one ``ticket`` named, atomically; serve the next ticket.

        Returns ``(ticket, was_holder)``, or None when nothing was held
        (``ticket`` None) or no live ticket has that number. Revoking the
        holder is :meth:`force_release`, but with ``ticket`` it happens only
        if that ticket still holds, so an operator never revokes a holder
        that took over after they looked. A revoked waiter's ``lock()``
        raises ``LockLostError`` instead of being served.

        The default implementation handles ``ticket`` None only; stores
        that can revoke a waiter override it.
        """
        if ticket is not None:
            raise NotImplementedError(f"{type(self).__name__} cannot revoke one ticket; revoke the holder")
        revoked = await self.force_release(conversation_id)
        return None if revoked is None else (revoked, True)

    async def ping(self) -> None:  # noqa: B027  (optional hook: nothing to check in memory)
        """Check that the backend answers; raise ``LockStoreUnavailable`` if not."""

    async def aclose(self) -> None:  # noqa: B027  (optional hook: not every store holds resources)
        """Release the store's resources. Locks still held are not released."""

    def statistics(self) -> Mapping[str, Any]:
        """Counters for debugging and metrics; keys depend on the store."""
        return {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
