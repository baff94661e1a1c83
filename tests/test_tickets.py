"""Property tests of the pure ticket rules (tickets.py) against a naive model.

The model keeps, per conversation, a plain list of live tickets in issue order
and recomputes who is served from first principles: the first ticket in the
list is served, a non-renewing served ticket lapses ``lifetime`` seconds after
it was granted. The book must agree with it after every step.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from convlock.tickets import (
    RECHECK_MARGIN,
    REVOKED,
    Terms,
    Ticket,
    TicketBook,
    may_forget,
    next_fencing_token,
    next_look,
    renew_interval,
)

CONVERSATIONS = ("a", "b", "c")


class FakeClock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class ModelTicket:
    ticket: Ticket
    cid: str
    renew: bool
    lifetime: float
    granted_at: float | None = None

    def expires(self) -> float:
        if self.granted_at is None or self.renew:
            return math.inf
        return self.granted_at + self.lifetime


@dataclass
class Model:
    queues: dict[str, list[ModelTicket]] = field(default_factory=dict)
    revoked: set[int] = field(default_factory=set)
    granted_order: dict[str, list[int]] = field(default_factory=dict)

    def grant_front(self, cid: str, now: float) -> None:
        queue = self.queues.get(cid, [])
        if queue and queue[0].granted_at is None:
            queue[0].granted_at = now
            self.granted_order.setdefault(cid, []).append(queue[0].ticket.number)
        if not queue:
            self.queues.pop(cid, None)

    def lapse(self, now: float) -> None:
        for cid in list(self.queues):
            queue = self.queues[cid]
            while queue and queue[0].expires() <= now:
                self.revoked.add(queue.pop(0).ticket.number)
                self.grant_front(cid, now)
            if not queue:
                self.queues.pop(cid, None)


class TicketBookMachine(RuleBasedStateMachine):
    """Random issue/release/abandon/force/time steps; the book must match the model."""

    live = Bundle("live")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.book = TicketBook(self.clock)
        self.model = Model()
        self.last_number = 0

    @rule(
        target=live,
        cid=st.sampled_from(CONVERSATIONS),
        renew=st.booleans(),
        lifetime=st.sampled_from([0.5, 1.0, 3.0]),
    )
    def issue(self, cid: str, renew: bool, lifetime: float) -> ModelTicket:
        ticket = Ticket(Terms(lifetime, renew))
        granted = self.book.issue(cid, ticket)
        assert ticket.number > self.last_number, "ticket numbers must strictly increase"
        self.last_number = ticket.number
        entry = ModelTicket(ticket, cid, renew, lifetime)
        self.model.queues.setdefault(cid, []).append(entry)
        self.model.grant_front(cid, self.clock.now)
        assert granted == (entry.granted_at is not None)
        return entry

    @rule(entry=consumes(live))
    def release(self, entry: ModelTicket) -> None:
        granted = self.book.release(entry.cid, entry.ticket)
        queue = self.model.queues.get(entry.cid, [])
        if queue and queue[0] is entry:
            queue.pop(0)
            self.model.grant_front(entry.cid, self.clock.now)
            expected = self.model.queues.get(entry.cid, [None])[0]
            assert (granted is None) == (expected is None)
            if expected is not None:
                assert granted is expected.ticket
        else:
            # A waiting or revoked ticket: release must change nothing.
            assert granted is None
            if entry in queue:
                # Put it back into play: a waiter that "released" is still waiting.
                self.live_again(entry)

    def live_again(self, entry: ModelTicket) -> None:
        # Withdraw it so the bundle and model stay consistent.
        self.book.abandon(entry.cid, entry.ticket)
        self.model.queues[entry.cid].remove(entry)
        if not self.model.queues[entry.cid]:
            self.model.queues.pop(entry.cid)

    @rule(entry=consumes(live))
    def abandon(self, entry: ModelTicket) -> None:
        granted = self.book.abandon(entry.cid, entry.ticket)
        queue = self.model.queues.get(entry.cid, [])
        was_head = bool(queue) and queue[0] is entry
        if entry in queue:
            queue.remove(entry)
        if was_head:
            self.model.grant_front(entry.cid, self.clock.now)
            expected = self.model.queues.get(entry.cid, [None])[0]
            assert granted is (None if expected is None else expected.ticket)
        else:
            assert granted is None
            if not queue:
                self.model.queues.pop(entry.cid, None)

    @rule(cid=st.sampled_from(CONVERSATIONS))
    def force_release(self, cid: str) -> None:
        revoked, granted = self.book.force_release(cid)
        queue = self.model.queues.get(cid, [])
        if not queue:
            assert revoked is None
            assert granted is None
            return
        head = queue.pop(0)
        self.model.revoked.add(head.ticket.number)
        assert revoked is head.ticket
        self.model.grant_front(cid, self.clock.now)
        expected = self.model.queues.get(cid, [None])[0]
        assert granted is (None if expected is None else expected.ticket)

    @rule(dt=st.sampled_from([0.1, 0.4, 0.5, 1.0, 2.5]))
    def advance(self, dt: float) -> None:
        self.clock.now += dt
        for cid in CONVERSATIONS:
            self.book.expire(cid)
        self.model.lapse(self.clock.now)

    @invariant()
    def agrees_with_model(self) -> None:
        for cid in CONVERSATIONS:
            queue = self.model.queues.get(cid, [])
            head = self.book.head(cid)
            if not queue:
                assert head is None, "an idle conversation must leave nothing behind"
                continue
            assert head is queue[0].ticket
            waiting = list(head.waiting or ())
            assert waiting == [entry.ticket for entry in queue[1:]], "FIFO order"
            assert all(t.number < u.number for t, u in itertools.pairwise(waiting))
        assert len(self.book) == len(self.model.queues)

    @invariant()
    def one_holder_and_revocations_match(self) -> None:
        for cid in CONVERSATIONS:
            for entry in self.model.queues.get(cid, [])[1:]:
                assert not entry.ticket.revoked
        for number in self.model.revoked:
            assert number > 0
        for cid, order in self.model.granted_order.items():
            assert order == sorted(order), f"grants of {cid} out of ticket order: {order}"

    @precondition(lambda self: self.book.last_issued > 0)
    @invariant()
    def counter_matches(self) -> None:
        assert self.book.last_issued == self.last_number


TestTicketBook = TicketBookMachine.TestCase
TestTicketBook.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_lapsed_head_with_no_waiter_is_replaced_on_issue() -> None:
    clock = FakeClock()
    book = TicketBook(clock)
    first = Ticket(Terms(1.0, renew=False))
    assert book.issue("c", first)
    clock.now = 1.0
    second = Ticket(Terms(1.0, renew=False))
    assert book.issue("c", second), "a lapsed holder with nobody behind it must not block"
    assert first.expires_at == REVOKED
    assert first.revoked
    assert book.release("c", first) is None, "the lapsed holder's release changes nothing"
    assert book.head("c") is second


def test_waiting_does_not_eat_into_the_lease() -> None:
    clock = FakeClock()
    book = TicketBook(clock)
    holder = Ticket(Terms(10.0, renew=True))
    waiter = Ticket(Terms(1.0, renew=False))
    assert book.issue("c", holder)
    assert not book.issue("c", waiter)
    clock.now = 50.0
    assert book.release("c", holder) is waiter
    assert waiter.expires_at == 51.0, "the lease starts when the ticket is granted"


@given(st.lists(st.tuples(st.integers(0, 10**6), st.booleans()), min_size=1, max_size=60))
def test_fencing_tokens_strictly_increase_across_forgetting(steps: list[tuple[int, bool]]) -> None:
    """Tokens rise even when the store forgets a conversation whenever it may."""
    now = 1_000_000
    last: int | None = None
    issued: list[int] = []
    for advance, try_forget in steps:
        now += advance  # the server clock never goes backwards
        if try_forget and last is not None and may_forget(last, now):
            last = None  # the idle conversation's counter key was deleted
        token = next_fencing_token(last, now)
        issued.append(token)
        last = token
    assert all(a < b for a, b in itertools.pairwise(issued))


def test_may_forget_only_after_clock_passes_last() -> None:
    assert not may_forget(100, 100)
    assert may_forget(100, 101)


def test_renew_interval_is_a_third() -> None:
    assert renew_interval(60.0) == 20.0


def test_next_look_polls_from_the_last_look_not_from_now() -> None:
    """A waiter that asks again after every sleep still looks once per poll period."""
    far = 1000.0
    # Asked 0.03 s after its last look with a 0.05 s period: 0.02 s to go.
    assert next_look(10.03, holder_ends=far, deadline=None, poll=0.05, last_look=10.0) == 10.05
    # Asked again after that sleep: the look is due (at or before now), not 0.05 s later.
    assert next_look(10.05, holder_ends=far, deadline=None, poll=0.05, last_look=10.0) <= 10.05
    # The holder's lease end and the deadline still win when they come first.
    assert next_look(10.0, holder_ends=10.01, deadline=None, poll=0.05, last_look=10.0) == 10.01 + RECHECK_MARGIN
    assert next_look(10.0, holder_ends=far, deadline=10.02, poll=0.05, last_look=10.0) == 10.02
    assert next_look(10.0, holder_ends=math.inf, deadline=None, poll=None, last_look=10.0) == math.inf
