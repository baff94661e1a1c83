"""Pure ticket-lock arithmetic: who is served, who waits, when a lease lapses.

Design
------
Each conversation has a FIFO queue of tickets. The ticket at the front (the
*head*) is *granted*: its owner holds the conversation. Every other ticket
waits. A ticket's number is drawn from one counter per :class:`TicketBook`,
so numbers only ever increase for a conversation, even after the
conversation went idle and was forgotten. That is what makes the number
usable as a *fencing token*.

This module does no I/O and never sleeps; time enters only through the
``clock`` the book is given, so tests can drive it with a fake clock and a
hypothesis state machine can compare it with a naive model. The in-memory
store wraps a book with futures and timers; the Redis store implements the
same rules in Lua (see ``convlock.redis.scripts``) because there the state must
change atomically on the server.

Leases
------
A granted ticket carries a lease. When the ticket is granted, the lease
starts afresh (``expires_at = now + lifetime``), so time spent waiting never
eats into the time the holder has. A *renewing* ticket's owner lives in the
same process as the book: it renews on every observation, so its lease is
represented as never lapsing (``expires_at = inf``). A non-renewing ticket
lapses at ``expires_at``; a lapsed head is skipped and marked revoked.

Waiting tickets have no lease here: in one process, a waiter that gives up
(cancellation, ``wait_timeout``) withdraws its ticket at once through
:meth:`TicketBook.abandon`, so a waiter can never be dead while queued. (In
Redis a waiter's process can die; there waiting tickets do carry leases.)

Trade-offs and open questions
-----------------------------
* Queues are per conversation and allocated only when a second ticket
  arrives: the uncontended path touches one dict entry and nothing else,
  which is what lets a lock cycle cost about as much as ``asyncio.Lock``.
* Abandoning a waiter is O(queue length) (``deque.remove``). Queues of one
  conversation are short in practice; a linked list would trade that for a
  slower common path.
* Should a non-renewing ticket's lease also run while it waits? The spec's
  framework let waiting tickets expire; we chose not to, because a waiter that
  is alive is by definition still interested.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Callable, Iterator

__all__ = [
    "REVOKED",
    "Terms",
    "Ticket",
    "MAX_LIFETIME",
    "MIN_LIFETIME",
    "RECHECK_MARGIN",
    "TicketBook",
    "check_lifetime",
    "may_forget",
    "next_fencing_token",
    "next_look",
    "renew_interval",
]

INF = math.inf


REVOKED = -math.inf
"""``expires_at`` of a ticket taken from the head by lapse or force-release."""


class Terms:
    """What one ``lock()`` call asked for; shared by every call that asked the same.

    ``lifetime`` is the lease length in seconds. ``renew`` says whether the
    owner keeps renewing it. ``wait_timeout`` bounds the wait (None: no bound).
    """

    __slots__ = ("lifetime", "renew", "wait_timeout")

    def __init__(self, lifetime: float, renew: bool = True, wait_timeout: float | None = None) -> None:
        self.lifetime = lifetime
        self.renew = renew
        self.wait_timeout = wait_timeout

    def __repr__(self) -> str:
        return f"Terms(lifetime={self.lifetime!r}, renew={self.renew!r}, wait_timeout={self.wait_timeout!r})"


class Ticket:
    """One draw from a conversation's queue.

    ``number`` is 0 until the ticket is issued. ``expires_at`` is when a
    granted non-renewing lease lapses: ``inf`` while waiting or renewing, and
    :data:`REVOKED` once the ticket was taken from the head by anything other
    than its own release (lease lapse or force-release). ``waiting`` is the
    queue behind a head ticket, or None.
    """

    # Four slots, no more: a store builds one ticket per lock cycle, and each
    # attribute set is a measurable share of an uncontended cycle.
    __slots__ = ("expires_at", "number", "terms", "waiting")

    def __init__(self, terms: Terms) -> None:
        self.number = 0
        self.terms = terms
        self.expires_at = INF
        self.waiting: deque[Ticket] | None = None

    @property
    def revoked(self) -> bool:
        """True once the ticket was taken from the head without its release."""
        return self.expires_at == REVOKED

    def __repr__(self) -> str:
        state = "revoked" if self.revoked else "live"
        return f"<Ticket {self.number} {state}>"


class TicketBook:
    """The ticket queues of every conversation of one store.

    Promises:

    * Fairness: tickets of a conversation are granted strictly in the order
      they were issued; a ticket is never granted while a lower live ticket of
      the same conversation is queued or held.
    * Mutual exclusion: at most one ticket per conversation is granted and
      not revoked at any moment.
    * Fencing: ticket numbers strictly increase across the whole book, so
      per conversation too, including after a conversation was forgotten.
    * Idle conversations leave nothing behind: a conversation with no ticket
      has no entry.

    The methods that can grant a waiting ticket return it, so that the caller
    can wake its owner. Nothing here blocks.

    ``heads`` maps each busy conversation to its granted ticket and
    ``last_issued`` is the highest number issued (0 before the first). Both are
    public for one purpose: a store on a hot path may inline the two idle
    cases, as ``InMemoryLockStore`` does. Issuing a *renewing* ticket for a
    conversation absent from ``heads`` grants it at once (number it
    ``last_issued + 1``, store both); releasing a head with no ``waiting``
    queue deletes its entry. Everything else must go through the methods.
    """

    __slots__ = ("_clock", "heads", "last_issued")

    def __init__(self, clock: Callable[[], float]) -> None:
        self.heads: dict[str, Ticket] = {}
        self._clock = clock
        self.last_issued = 0

    def __len__(self) -> int:
        return len(self.heads)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.heads))

    def is_granted(self, conversation_id: str, ticket: Ticket) -> bool:
        """Whether ``ticket`` is the conversation's head, and so holds it."""
        return self.heads.get(conversation_id) is ticket

    def head(self, conversation_id: str) -> Ticket | None:
        """The granted ticket of a conversation, or None when it is idle."""
        return self.heads.get(conversation_id)

    def issue(self, conversation_id: str, ticket: Ticket) -> bool:
        """Number ``ticket`` and queue it; return True if it was granted at once.

        A lapsed head with nobody behind it is revoked and replaced; a lapsed
        head with waiters is left for :meth:`expire`, so that the waiters,
        who came first, are served first.
        """
        ticket.number = number = self.last_issued + 1
        self.last_issued = number
        heads = self.heads
        head = heads.get(conversation_id)
        if head is not None:
            if head.waiting is not None or head.expires_at == INF or head.expires_at > self._clock():
                if head.waiting is None:
                    head.waiting = deque((ticket,))
                else:
                    head.waiting.append(ticket)
                return False
            head.expires_at = REVOKED
        heads[conversation_id] = ticket
        if not ticket.terms.renew:
            ticket.expires_at = self._clock() + ticket.terms.lifetime
        return True

    def release(self, conversation_id: str, ticket: Ticket) -> Ticket | None:
        """End ``ticket``'s hold and grant the next ticket, which is returned.

        Releasing a ticket that no longer holds (revoked, or never granted)
        changes nothing and returns None.
        """
        heads = self.heads
        if heads.get(conversation_id) is not ticket:
            return None
        if ticket.waiting is None:
            # Nobody waits: forget the conversation (the common case, inlined).
            del heads[conversation_id]
            return None
        return self._grant_next(conversation_id, ticket)

    def abandon(self, conversation_id: str, ticket: Ticket) -> Ticket | None:
        """Withdraw ``ticket`` whatever its state; return a newly granted ticket.

        A granted ticket is released (its owner gave up just as it was
        served). A waiting ticket leaves the queue without disturbing the
        order of the others.
        """
        head = self.heads.get(conversation_id)
        if head is ticket:
            return self._grant_next(conversation_id, ticket)
        if head is not None and head.waiting is not None:
            with contextlib.suppress(ValueError):  # already granted or withdrawn
                head.waiting.remove(ticket)
            if not head.waiting:
                head.waiting = None
        return None

    def expire(self, conversation_id: str) -> Ticket | None:
        """Revoke a lapsed head and grant the next ticket, which is returned."""
        head = self.heads.get(conversation_id)
        granted = None
        while head is not None and head.expires_at <= self._clock():
            head.expires_at = REVOKED
            head = granted = self._grant_next(conversation_id, head)
        return granted

    def force_release(self, conversation_id: str) -> tuple[Ticket | None, Ticket | None]:
        """Revoke the head whatever its lease; return it and the ticket granted next."""
        head = self.heads.get(conversation_id)
        if head is None:
            return None, None
        head.expires_at = REVOKED
        return head, self._grant_next(conversation_id, head)

    def revoke_waiting(self, conversation_id: str, number: int) -> Ticket | None:
        """Take the waiting ticket numbered ``number`` out of the queue, marked revoked.

        Returns it, or None when no ticket with that number waits. The
        order of the others does not change and nobody is granted.
        """
        head = self.heads.get(conversation_id)
        if head is None or head.waiting is None:
            return None
        for ticket in head.waiting:
            if ticket.number == number:
                head.waiting.remove(ticket)
                if not head.waiting:
                    head.waiting = None
                ticket.expires_at = REVOKED
                return ticket
        return None

    def _grant_next(self, conversation_id: str, head: Ticket) -> Ticket | None:
        queue = head.waiting
        head.waiting = None
        if not queue:
            del self.heads[conversation_id]
            return None
        nxt = queue.popleft()
        nxt.waiting = queue or None
        if not nxt.terms.renew:
            nxt.expires_at = self._clock() + nxt.terms.lifetime
        self.heads[conversation_id] = nxt
        return nxt


def next_fencing_token(last_issued: int | None, now_us: int) -> int:
    """The next ticket number for a conversation whose state may have been deleted.

    Stores that forget idle conversations (Redis deletes their keys) cannot
    count from the last number. They take the larger of "last + 1" and the
    server clock in microseconds: while the state exists numbers go up by at
    least one, and after it is gone the clock has moved past every number
    issued before, provided the store deletes state only once the clock has
    passed its last number (see :func:`may_forget`) and the clock does not go
    backwards.
    """
    if last_issued is None:
        return now_us
    return max(last_issued + 1, now_us)


def may_forget(last_issued: int, now_us: int) -> bool:
    """Whether an idle conversation's counter can be deleted without risk.

    Deleting is safe once the clock is past the last number: the next
    :func:`next_fencing_token` then returns a larger one.
    """
    return now_us > last_issued


def renew_interval(lifetime: float) -> float:
    """How often a renewing owner refreshes a lease of ``lifetime`` seconds.

    A third of the lifetime leaves two chances to succeed before the lease
    lapses, so one slow or lost renewal does not cost the lock.
    """
    return lifetime / 3.0


#: The lease lengths a Redis store accepts, in seconds. Shorter leases could
#: lapse before the reply that grants them arrives; longer ones overflow the
#: integer milliseconds Redis takes for a TTL and hide a dead holder for
#: longer than anyone would wait. See docs/redis.md.
MIN_LIFETIME = 0.01
MAX_LIFETIME = 30 * 24 * 3600.0


def check_lifetime(value: float) -> float:
    """Return ``value`` if it is a lease length within the bounds, else raise ``ValueError`` naming them."""
    if not MIN_LIFETIME <= value <= MAX_LIFETIME:
        raise ValueError(
            f"lifetime must be from {MIN_LIFETIME:g} s (10 ms) to {MAX_LIFETIME:g} s (30 days), "
            f"got {value!r}"
        )
    return value


#: A waiter re-checks this long after the holder's lease should have ended,
#: so that its check runs after the server's clock passed that end.
RECHECK_MARGIN = 0.002


def next_look(
    now: float,
    *,
    holder_ends: float,
    deadline: float | None,
    poll: float | None,
    last_look: float,
) -> float:
    """When a waiter should next act on its own, on its monotonic clock.

    ``holder_ends`` is when the holder's lease ends at the latest, as seen
    from this waiter (``inf`` when a holder in this process will hand over
    itself); ``deadline`` is its ``wait_timeout`` (None: none); ``poll`` is a
    fallback period when nothing would wake it (None: none), counted from
    ``last_look``, the waiter's last look at the queue. (Counted from
    ``now``, a caller that asks again after each wake-up or sleep would push
    the look back for ever.) Wake-ups and lease keep-alives come from
    elsewhere; this only bounds the wait so that a dead holder is noticed
    ``RECHECK_MARGIN`` after its lease and a deadline is kept to the moment.
    A result at or before ``now`` means: look now.
    """
    target = holder_ends + RECHECK_MARGIN
    if deadline is not None and deadline < target:
        target = deadline
    if poll is not None and last_look + poll < target:
        target = last_look + poll
    return target
