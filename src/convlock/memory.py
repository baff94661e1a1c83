"""InMemoryLockStore: the default store, for a single process.

Design
------
A :class:`~convlock.tickets.TicketBook` holds the queues; this module adds
what a book cannot have: futures that park waiting tasks, and a timer per
contended conversation that revokes a non-renewing head when its lease
lapses. Hand-off is direct: the task that releases grants the next ticket in
the book and resolves that waiter's future, so the waiter runs on the next
event-loop iteration. Nothing polls and nothing sleeps.

The object that ``lock()`` returns is at once the ticket, the async context
manager and the ``held`` handle. One allocation per cycle, no tasks and no
timers on the uncontended path: that is how an acquire plus release stays
within twice the cost of an ``asyncio.Lock`` cycle (``convlock bench (scenarios 1 and 2)``).

Leases: the owner of a ticket lives in this process, so a renewing lease is
renewed whenever anything looks at it; it can lapse only with the process,
which takes the store along. Non-renewing leases lapse on time and their
holder sees ``held.lost``.

Open questions: the store is not thread-safe (like asyncio's primitives) and
a store's waiters must all run on one event loop at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any

from .errors import LockLostError, LockTimeoutError
from .ids import MAX_CONVERSATION_ID_BYTES, check_conversation_id
from .observe import LockObserver
from .store import HeldLock, LockSnapshot, LockStore, TicketLease, check_seconds, entry_refusal
from .tickets import INF, Terms, Ticket, TicketBook

__all__ = ["InMemoryLockStore"]

logger = logging.getLogger("convlock.memory")


class _Hold(Ticket, HeldLock):
    """A ticket of an in-memory store, doubling as its context manager.

    Built only by :meth:`InMemoryLockStore.lock`, which sets every slot.
    ``_future`` is set only by ``_wait()``, on the contended path.
    """

    __slots__ = ("_future", "_granted_at", "_since", "_store", "conversation_id")

    _store: InMemoryLockStore
    _future: asyncio.Future[None] | None
    # Set only on slow paths or when the store has an observer, so the
    # uncontended cycle without one writes neither.
    _granted_at: float
    _since: float

    @property
    def ticket(self) -> int:
        return self.number

    @property
    def lost(self) -> bool:
        # Revoked tickets have expires_at == -inf, so one comparison covers
        # both a revocation and a lapse that nobody has processed yet.
        expires_at = self.expires_at
        return expires_at != INF and expires_at <= time.monotonic()

    async def ensure(self) -> None:
        if self.lost:
            raise LockLostError.for_ticket(self.conversation_id, self.number, self.terms.lifetime)

    @property
    def granted_at_once(self) -> bool:
        # _wait() sets _since: a ticket that never waited has it unset.
        return bool(self.number) and not hasattr(self, "_since")

    async def __aenter__(self) -> _Hold:
        store = self._store
        if self.number or store._closed:
            raise entry_refusal(self.conversation_id, entered=bool(self.number))
        cid = self.conversation_id
        book = store._book
        if self.terms.renew and cid not in book.heads:
            # TicketBook.issue for an idle conversation, inlined as its
            # docstring allows: two calls fewer is a sixth of the cycle.
            book.last_issued = self.number = book.last_issued + 1
            book.heads[cid] = self
        elif not book.issue(cid, self):
            await store._wait(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        store = self._store
        cid = self.conversation_id
        heads = store._book.heads
        if self.waiting is None and heads.get(cid) is self:
            del heads[cid]  # TicketBook.release with nobody waiting, inlined.
        else:
            granted = store._book.release(cid, self)
            if granted is not None:
                store._grant(cid, granted)


class _ObservedHold(_Hold):
    """A hold of a store that has an observer: reports its grant and release.

    A separate class, chosen by ``lock()``, so that a store without an
    observer runs :class:`_Hold`'s cycle untouched. A grant after a wait is
    reported by ``InMemoryLockStore._wait`` (which sets ``_since``).
    """

    __slots__ = ()

    async def __aenter__(self) -> _Hold:
        await _Hold.__aenter__(self)
        observer = self._store._observer
        if observer is not None and getattr(self, "_since", None) is None:
            self._granted_at = time.monotonic()
            observer.granted(self.conversation_id, self.number, 0.0, "immediate")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        observer = self._store._observer
        if observer is not None:
            granted_at = getattr(self, "_granted_at", None)
            held = 0.0 if granted_at is None else time.monotonic() - granted_at
            observer.released(self.conversation_id, self.number, held)
        await _Hold.__aexit__(self, exc_type, exc, tb)


_new_hold = object.__new__


class InMemoryLockStore(LockStore):
    """Ticket locks that live in this process's memory: the default store.

    Use it for a single server process. Replicas, or several worker
    processes, need a store they share, such as ``RedisLockStore``.

    Fairness: strict FIFO per conversation, by ticket number. Hand-off wakes
    exactly the next waiter, with no polling. Cancellation or ``wait_timeout``
    withdraws the waiter's ticket at once. A conversation with no holder and
    no waiter leaves nothing in memory. Ticket numbers come from one counter
    per store, so they strictly increase per conversation for the store's
    lifetime.
    """

    def __init__(self, *, lifetime: float | None = None, wait_timeout: float | None = None) -> None:
        super().__init__(lifetime=lifetime, wait_timeout=wait_timeout)
        self._default_terms = Terms(self.lifetime, True, self.wait_timeout)
        self._book = TicketBook(time.monotonic)
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._closed = False
        #: _ObservedHold once an observer is added (see add_observer).
        self._hold_type: type[_Hold] = _Hold
        # Counted on slow paths only, so the uncontended cycle pays nothing.
        self._contended = 0
        self._timeouts = 0
        self._cancelled = 0
        self._lapsed = 0
        self._forced = 0

    def lock(
        self,
        conversation_id: str,
        *,
        lifetime: float | None = None,
        wait_timeout: float | None = None,
        renew: bool = True,
    ) -> _Hold:
        # The common case of check_conversation_id, inlined for the hot path.
        if not (
            type(conversation_id) is str
            and 0 < len(conversation_id) <= MAX_CONVERSATION_ID_BYTES
            and conversation_id.isascii()
        ):
            check_conversation_id(conversation_id)
        # Built without __init__: one Python frame per lock() instead of two,
        # which is a sixth of an uncontended cycle.
        if lifetime is None and wait_timeout is None and renew:
            terms = self._default_terms
        else:
            terms = Terms(
                self.lifetime if lifetime is None else check_seconds("lifetime", lifetime) or 0.0,
                bool(renew),
                self.wait_timeout if wait_timeout is None else check_seconds("wait_timeout", wait_timeout),
            )
        hold = _new_hold(self._hold_type)
        hold.number = 0
        hold.terms = terms
        hold.expires_at = INF
        hold.waiting = None
        hold._store = self
        hold.conversation_id = conversation_id
        return hold

    async def _wait(self, hold: _Hold) -> None:
        """Park ``hold`` until it is granted, withdrawing it on any exit but success."""
        self._contended += 1
        cid = hold.conversation_id
        future = hold._future = asyncio.get_running_loop().create_future()
        hold._since = time.monotonic()
        observer = self._observer
        if observer is not None:
            observer.waiting(cid, hold.number)
        self._arm_expiry(cid)
        try:
            if hold.terms.wait_timeout is None:
                await future
            else:
                async with asyncio.timeout(hold.terms.wait_timeout):
                    await future
        except BaseException as exc:
            granted = self._book.abandon(cid, hold)
            if granted is not None:
                self._grant(cid, granted)
            self._disarm_if_uncontended(cid)
            waited = time.monotonic() - hold._since
            observer = self._observer
            if isinstance(exc, TimeoutError):
                self._timeouts += 1
                if observer is not None:
                    observer.timed_out(cid, hold.number, waited)
                raise LockTimeoutError(
                    f"waited {hold.terms.wait_timeout:g}s for conversation {cid!r} "
                    f"without being served (ticket {hold.number} withdrawn)",
                    conversation_id=cid,
                ) from None
            if isinstance(exc, LockLostError):  # revoked by an operator while waiting
                if observer is not None:
                    observer.abandoned(cid, hold.number, waited, "revoked")
                raise
            self._cancelled += 1
            if observer is not None:
                observer.abandoned(cid, hold.number, waited, "cancelled")
            raise
        finally:
            hold._future = None
        observer = self._observer
        if observer is not None:
            hold._granted_at = now = time.monotonic()
            observer.granted(cid, hold.number, now - hold._since, "handoff")

    def _grant(self, conversation_id: str, granted: Ticket) -> None:
        """Wake the owner of a ticket the book has just granted."""
        assert isinstance(granted, _Hold)
        future = granted._future
        if future is not None and not future.done():
            future.set_result(None)
        self._disarm_if_uncontended(conversation_id)
        self._arm_expiry(conversation_id)

    def _arm_expiry(self, conversation_id: str) -> None:
        """Schedule a lapse check when a finite lease has someone waiting behind it."""
        if conversation_id in self._timers:
            return
        head = self._book.head(conversation_id)
        if head is None or head.waiting is None or head.expires_at == INF:
            return
        delay = max(0.0, head.expires_at - time.monotonic())
        loop = asyncio.get_running_loop()
        self._timers[conversation_id] = loop.call_later(delay, self._on_expiry, conversation_id)

    def _disarm_if_uncontended(self, conversation_id: str) -> None:
        timer = self._timers.get(conversation_id)
        if timer is None:
            return
        head = self._book.head(conversation_id)
        if head is None or head.waiting is None or head.expires_at == INF:
            timer.cancel()
            del self._timers[conversation_id]

    def _on_expiry(self, conversation_id: str) -> None:
        del self._timers[conversation_id]
        self._expire(conversation_id)
        self._arm_expiry(conversation_id)

    def _expire(self, conversation_id: str) -> None:
        head = self._book.head(conversation_id)
        granted = self._book.expire(conversation_id)
        if head is not None and head.revoked:
            self._lapsed += 1
            if self._observer is not None:
                self._observer.lapsed(conversation_id, head.number)
            # A lapse means a holder ran past its lease: worth an operator's eye.
            logger.warning(
                "lease of ticket %d on conversation %r lapsed after %gs; serving %s",
                head.number,
                conversation_id,
                head.terms.lifetime,
                "nobody" if granted is None else f"ticket {granted.number}",
            )
        if granted is not None:
            self._grant(conversation_id, granted)

    async def inspect(self, conversation_id: str) -> LockSnapshot | None:
        """Snapshot the queue; a lapsed head is revoked first, as a waiter would see."""
        check_conversation_id(conversation_id)
        self._expire(conversation_id)
        head = self._book.head(conversation_id)
        if head is None:
            return None
        now = time.monotonic()

        def lease(ticket: Ticket, *, waits: bool) -> TicketLease:
            # A renewing lease is renewed on observation: it has a full lifetime left.
            left = ticket.terms.lifetime if ticket.expires_at == INF else ticket.expires_at - now
            since = getattr(ticket, "_since", None) if waits else None
            waited = None if since is None else max(0.0, now - since)
            return TicketLease(ticket.number, max(0.0, left), waited)

        waiting = tuple(lease(t, waits=True) for t in head.waiting or ())
        return LockSnapshot(conversation_id, lease(head, waits=False), waiting)

    async def conversations(self) -> AsyncIterator[str]:
        for conversation_id in self._book:
            self._expire(conversation_id)
            if self._book.head(conversation_id) is not None:
                yield conversation_id

    async def force_release(self, conversation_id: str) -> int | None:
        check_conversation_id(conversation_id)
        revoked, granted = self._book.force_release(conversation_id)
        if revoked is None:
            return None
        self._forced += 1
        if self._observer is not None:
            self._observer.revoked(conversation_id, revoked.number, holder=True)
        if granted is not None:
            self._grant(conversation_id, granted)
        else:
            self._disarm_if_uncontended(conversation_id)
        return revoked.number

    async def revoke(self, conversation_id: str, ticket: int | None = None) -> tuple[int, bool] | None:
        """Revoke the holder, or ``ticket`` whether it holds or waits; see :meth:`LockStore.revoke`.

        A revoked waiter's ``lock()`` raises ``LockLostError`` at once.
        """
        check_conversation_id(conversation_id)
        self._expire(conversation_id)
        head = self._book.head(conversation_id)
        if head is None:
            return None
        if ticket is None or head.number == ticket:
            revoked = await self.force_release(conversation_id)
            return None if revoked is None else (revoked, True)
        taken = self._book.revoke_waiting(conversation_id, ticket)
        if taken is None:
            return None
        self._forced += 1
        if self._observer is not None:
            self._observer.revoked(conversation_id, taken.number, holder=False)
        assert isinstance(taken, _Hold)
        future = taken._future
        if future is not None and not future.done():
            future.set_exception(
                LockLostError(
                    f"ticket {taken.number} of conversation {conversation_id!r} was revoked by an "
                    "operator before it was served",
                    conversation_id=conversation_id,
                )
            )
        self._disarm_if_uncontended(conversation_id)
        return taken.number, False

    def add_observer(self, observer: LockObserver) -> None:
        """See :meth:`LockStore.add_observer`; holds made from now on report to it."""
        super().add_observer(observer)
        self._hold_type = _ObservedHold

    async def aclose(self) -> None:
        """Refuse new locks. Holders and waiters already queued are served as usual."""
        self._closed = True

    def statistics(self) -> Mapping[str, Any]:
        """Counters for debugging: queue sizes now, and events since creation."""
        waiting = 0
        for conversation_id in self._book:
            head = self._book.head(conversation_id)
            if head is not None and head.waiting is not None:
                waiting += len(head.waiting)
        return {
            "backend": "in_memory",
            "conversations": len(self._book),
            "waiting": waiting,
            "tickets_issued": self._book.last_issued,
            "contended_acquires": self._contended,
            "wait_timeouts": self._timeouts,
            "cancelled_waits": self._cancelled,
            "lapsed_leases": self._lapsed,
            "force_releases": self._forced,
            "expiry_timers": len(self._timers),
        }
