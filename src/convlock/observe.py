"""Lock events as they happen: the observer hook every store calls, and a logger for it.

Design
------
A store has at most one *observer* (``store.add_observer(obs)`` combines
several into a group). The store calls it at each lock event: a ticket
starts waiting, is granted (at once or after a wait, and why it woke), is
released, times out, is abandoned (cancelled, store error, revoked by an
operator), a holder's lease lapses, an operator revokes a ticket, and a
store call fails. The observer sees the conversation ID and the ticket of
each event, so it can log them; metrics must not put the ID in a label
(see :mod:`convlock.metrics`).

Cost: with no observer a store reads no clock and makes no call. The
in-memory store's uncontended cycle is the same code as before observers
existed: ``lock()`` picks the hold class (a plain one, or one that reports
its grant and release) from one attribute, so the ``is None`` tests live
only in the observed class and on slow paths. The Redis store tests
``is None`` at each event, next to a network round trip. With an observer each event is one
Python call; observers must be quick and must not raise (a store does not
guard the call, so an exception would surface in the caller's ``lock()``).

Why an observer and not logging calls in the stores: the uncontended path
of the in-memory store cannot afford even a disabled ``logger.debug`` per
event. :class:`LockEventLog` turns events into log lines; ``convlock run``
attaches it (and the metrics) to the store it builds, and a library user
attaches what they want.

Open question: observers are called synchronously on the event loop, so a
slow observer slows every lock; there is no queue in between.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

__all__ = ["AbandonReason", "GrantReason", "LockEventLog", "LockObserver", "ObserverGroup", "combine"]

GrantReason = Literal["immediate", "handoff", "recheck"]
"""Why a ticket was granted: at once on drawing it; woken by the hand-off of
a release, a lapse, a withdrawal or a revocation (``handoff``); or found
granted when the waiter re-checked the queue on its timer (``recheck``, a
Redis waiter whose wake-up was missed or whose holder's lease ran out)."""

AbandonReason = Literal["cancelled", "error", "revoked"]


class LockObserver:
    """Receives a store's lock events; every method is a no-op here, override what you need.

    Promises the store keeps: for each ticket, ``waiting`` is called at most
    once, and is followed by exactly one of ``granted`` (with a reason other
    than ``immediate``), ``timed_out`` or ``abandoned``. Every ``granted``
    is followed by exactly one ``released`` when the holder leaves its
    ``async with`` block, even if the lock was lost meanwhile. ``lapsed``
    and ``revoked`` may come on top of that. Times are seconds on the local
    monotonic clock.
    """

    __slots__ = ()

    def waiting(self, conversation_id: str, ticket: int) -> None:
        """``ticket`` was drawn and queues behind another."""

    def granted(self, conversation_id: str, ticket: int, waited: float, reason: GrantReason) -> None:
        """``ticket`` holds the lock after ``waited`` seconds (0 when granted at once in memory)."""

    def released(self, conversation_id: str, ticket: int, held: float) -> None:
        """The holder of ``ticket`` left its block after holding it ``held`` seconds."""

    def timed_out(self, conversation_id: str, ticket: int, waited: float) -> None:
        """``ticket`` was withdrawn because its ``wait_timeout`` passed."""

    def abandoned(self, conversation_id: str, ticket: int, waited: float, reason: AbandonReason) -> None:
        """A waiting ``ticket`` left the queue unserved: cancelled, the store failed, or revoked."""

    def lapsed(self, conversation_id: str, ticket: int) -> None:
        """The holder of ``ticket`` lost the lock: its lease ended, or (Redis) it was revoked elsewhere."""

    def revoked(self, conversation_id: str, ticket: int, *, holder: bool) -> None:
        """An operator revoked ``ticket`` through this store (``holder``: it held the lock)."""

    def store_error(self, error: BaseException) -> None:
        """A call to the store's backend failed (the caller gets ``LockStoreUnavailable``)."""


class ObserverGroup(LockObserver):
    """Forwards every event to several observers, in order."""

    __slots__ = ("observers",)

    def __init__(self, observers: Sequence[LockObserver]) -> None:
        self.observers = tuple(observers)

    def waiting(self, conversation_id: str, ticket: int) -> None:
        for o in self.observers:
            o.waiting(conversation_id, ticket)

    def granted(self, conversation_id: str, ticket: int, waited: float, reason: GrantReason) -> None:
        for o in self.observers:
            o.granted(conversation_id, ticket, waited, reason)

    def released(self, conversation_id: str, ticket: int, held: float) -> None:
        for o in self.observers:
            o.released(conversation_id, ticket, held)

    def timed_out(self, conversation_id: str, ticket: int, waited: float) -> None:
        for o in self.observers:
            o.timed_out(conversation_id, ticket, waited)

    def abandoned(self, conversation_id: str, ticket: int, waited: float, reason: AbandonReason) -> None:
        for o in self.observers:
            o.abandoned(conversation_id, ticket, waited, reason)

    def lapsed(self, conversation_id: str, ticket: int) -> None:
        for o in self.observers:
            o.lapsed(conversation_id, ticket)

    def revoked(self, conversation_id: str, ticket: int, *, holder: bool) -> None:
        for o in self.observers:
            o.revoked(conversation_id, ticket, holder=holder)

    def store_error(self, error: BaseException) -> None:
        for o in self.observers:
            o.store_error(error)


def combine(current: LockObserver | None, new: LockObserver) -> LockObserver:
    """``current`` and ``new`` as one observer (``new`` alone when there is none yet)."""
    if current is None:
        return new
    if isinstance(current, ObserverGroup):
        return ObserverGroup([*current.observers, new])
    return ObserverGroup([current, new])


class LockEventLog(LockObserver):
    """Logs every lock event to the ``convlock.locks`` logger, naming the conversation and ticket.

    Levels: grants, releases and waits are DEBUG (a debug line says why a
    waiter woke); revocations are INFO; lapses, timeouts and store errors
    are WARNING. Each record carries ``conversation_id``, ``ticket`` and
    ``event`` attributes, which the JSON log format writes as fields.
    Conversation IDs are written with ``%r``, so control characters in an
    ID cannot forge a log line.
    """

    __slots__ = ("logger",)

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("convlock.locks")

    def _log(self, level: int, event: str, cid: str, ticket: int, msg: str, *args: object) -> None:
        if self.logger.isEnabledFor(level):
            self.logger.log(
                level,
                "conversation %r ticket %d: " + msg,
                cid,
                ticket,
                *args,
                extra={"conversation_id": cid, "ticket": ticket, "event": event},
            )

    def waiting(self, conversation_id: str, ticket: int) -> None:
        self._log(logging.DEBUG, "waiting", conversation_id, ticket, "waiting behind the holder")

    def granted(self, conversation_id: str, ticket: int, waited: float, reason: GrantReason) -> None:
        if reason == "immediate":
            self._log(logging.DEBUG, "granted", conversation_id, ticket, "granted at once")
        else:
            why = (
                "woken by the hand-off from the ticket before it"
                if reason == "handoff"
                else "found granted on its timed re-check (no wake-up arrived, or the holder's lease ended)"
            )
            self._log(
                logging.DEBUG, "granted", conversation_id, ticket, "granted after %.3fs: %s", waited, why
            )

    def released(self, conversation_id: str, ticket: int, held: float) -> None:
        self._log(logging.DEBUG, "released", conversation_id, ticket, "released after holding %.3fs", held)

    def timed_out(self, conversation_id: str, ticket: int, waited: float) -> None:
        self._log(
            logging.WARNING,
            "timed_out",
            conversation_id,
            ticket,
            "gave up after waiting %.3fs (wait_timeout); ticket withdrawn",
            waited,
        )

    def abandoned(self, conversation_id: str, ticket: int, waited: float, reason: AbandonReason) -> None:
        level = logging.DEBUG if reason == "cancelled" else logging.WARNING
        self._log(
            level, "abandoned", conversation_id, ticket, "left the queue after %.3fs: %s", waited, reason
        )

    def lapsed(self, conversation_id: str, ticket: int) -> None:
        self._log(
            logging.WARNING,
            "lapsed",
            conversation_id,
            ticket,
            "lost the lock (lease lapsed or revoked); writes fenced with this ticket will be refused",
        )

    def revoked(self, conversation_id: str, ticket: int, *, holder: bool) -> None:
        self._log(
            logging.INFO,
            "revoked",
            conversation_id,
            ticket,
            "revoked by an operator (%s)",
            "the holder; the next ticket is served" if holder else "a waiting ticket",
        )

    def store_error(self, error: BaseException) -> None:
        if self.logger.isEnabledFor(logging.WARNING):
            self.logger.warning("lock store call failed: %s", error, extra={"event": "store_error"})
