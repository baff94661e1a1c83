"""The verify checker on small hand-made histories: a clean one, and one per violated property.

Each violating history breaks exactly one property, so the test also shows
that the other properties do not fire on it.
"""

from __future__ import annotations

from typing import Any

import pytest

from convlock.verify.checker import PROPERTIES, CheckParams, Outcome, check, percentile
from convlock.verify.history import (
    ERROR,
    GRANT,
    HOLD_STOP,
    KILL,
    LOST,
    PAUSE,
    READ,
    RELEASE,
    REQUEST,
    RESTART,
    WRITE,
    WRITE_START,
    Event,
)

PARAMS = CheckParams(lifetime=2.0, wait_timeout=3.0, slack=0.5)


class History:
    """Builds worker events the way the workers write them."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._count = 0

    def add(self, event: Event) -> Event:
        self.events.append(event)
        return event

    def hold(
        self,
        worker: str,
        conv: str,
        ticket: int,
        *,
        asked: float,
        granted: float,
        released: float | None,
        write: bool | None = True,
        lost_at_release: bool = False,
    ) -> str:
        """A request that is granted, reads, writes (accepted, refused, or None: never answered) and releases."""
        self._count += 1
        req = f"{worker}:{self._count}"
        common: dict[str, Any] = {"worker": worker, "req": req, "conv": conv}
        self.add(Event(asked, REQUEST, **common))
        self.add(Event(granted, GRANT, ticket=ticket, lost=False, **common))
        end = released if released is not None else granted + 0.004
        self.add(Event(granted + 0.001, READ, ticket=ticket, lost=False, value=0, seen=ticket, **common))
        self.add(Event(granted + 0.002, WRITE_START, ticket=ticket, lost=False, **common))
        if write is not None:
            self.add(Event(granted + 0.003, WRITE, ticket=ticket, accepted=write, seen=ticket, **common))
        if released is not None:
            self.add(Event(end, RELEASE, ticket=ticket, lost=lost_at_release, **common))
        return req

    def clean(self) -> History:
        """Two workers taking turns on two conversations; one waits for a hand-off."""
        self.hold("w1", "a", 10, asked=0.0, granted=0.01, released=0.10)
        self.hold("w2", "a", 11, asked=0.05, granted=0.11, released=0.20)
        self.hold("w1", "b", 5, asked=0.30, granted=0.31, released=0.40)
        self.hold("w2", "a", 12, asked=0.50, granted=0.51, released=0.60)
        return self


def registers(history: History) -> dict[str, int]:
    """Each conversation's accepted writes: what a register that lost nothing holds."""
    counts: dict[str, int] = {}
    for event in history.events:
        if event.kind == WRITE and event.accepted:
            counts[event.conv] = counts.get(event.conv, 0) + 1
    return counts


def only_failing(history: History, outcome: Outcome | None = None) -> list[str]:
    result = check(history.events, PARAMS, outcome or Outcome(registers=registers(history)))
    return [name for name in PROPERTIES if result.properties[name].violations]


def test_clean_history_passes_every_property() -> None:
    history = History().clean()
    result = check(reversed(history.events), PARAMS, Outcome(registers=registers(history)))
    assert result.ok, result.violation_counts
    assert set(result.violation_counts) == set(PROPERTIES)
    assert result.grants == 4
    assert result.requests == 4
    assert all(result.properties[name].checked > 0 for name in PROPERTIES)
    assert result.handoffs == [pytest.approx(0.01)]  # w2 waited from 0.05 for w1's release at 0.10


def test_overlapping_holds_violate_mutual_exclusion() -> None:
    history = History()
    history.hold("w1", "a", 10, asked=0.0, granted=0.01, released=0.10)
    history.hold("w2", "a", 11, asked=0.02, granted=0.05, released=0.15)
    result = check(history.events, PARAMS, Outcome(registers={"a": 2}))
    assert only_failing(history, Outcome(registers={"a": 2})) == ["mutual_exclusion"]
    [violation] = result.properties["mutual_exclusion"].violations
    assert "ticket 11 was granted to w2 while ticket 10 of w1" in violation.message
    assert [event.ticket for event in violation.events] == [10, 11]


def test_a_lapsed_hold_may_be_overlapped_but_not_before_it_was_last_seen_valid() -> None:
    # w1 is paused while holding; it had seen its lease valid until 0.02 and its
    # request was at 0.0, so the lease lasted until at least 2.0 - tolerance.
    history = History()
    req = history.hold("w1", "a", 10, asked=0.0, granted=0.01, released=None, write=None)
    history.add(Event(0.015, HOLD_STOP, worker="w1"))
    history.add(Event(0.012, PAUSE, worker="w1", end=2.6))
    history.add(Event(2.61, LOST, worker="w1", req=req, conv="a", ticket=10))
    history.add(Event(2.61, RELEASE, worker="w1", req=req, conv="a", ticket=10, lost=True))
    history.hold("w2", "a", 11, asked=0.02, granted=2.1, released=2.2)
    assert only_failing(history) == []
    early = History()
    req = early.hold("w1", "a", 10, asked=0.0, granted=0.01, released=None, write=None)
    early.add(Event(0.012, PAUSE, worker="w1", end=2.6))
    early.add(Event(2.61, LOST, worker="w1", req=req, conv="a", ticket=10))
    early.hold("w2", "a", 11, asked=0.02, granted=1.0, released=1.1)  # the lease could not have lapsed yet
    assert only_failing(early) == ["mutual_exclusion"]


def test_a_killed_holders_lease_lasts_a_lifetime_from_its_request() -> None:
    history = History()
    history.hold("w1", "a", 10, asked=0.0, granted=0.01, released=None, write=None)
    history.add(Event(0.5, KILL, worker="w1", detail="holding"))
    history.hold("w2", "a", 11, asked=0.1, granted=1.2, released=1.3)
    assert only_failing(history) == ["mutual_exclusion"]
    result = check(history.events, PARAMS, Outcome(registers=registers(history)))
    assert result.faults["kill"] == 1
    assert result.kills_while_holding == 1
    later = History()
    later.hold("w1", "a", 10, asked=0.0, granted=0.01, released=None, write=None)
    later.add(Event(0.5, KILL, worker="w1", detail="holding"))
    later.hold("w2", "a", 11, asked=0.1, granted=2.0, released=2.1)
    assert only_failing(later) == []


def test_grants_out_of_ticket_order_violate_fifo() -> None:
    history = History()
    history.hold("w1", "a", 20, asked=0.0, granted=0.01, released=0.10)
    history.hold("w2", "a", 15, asked=0.005, granted=0.20, released=0.30)  # drawn earlier, served later
    assert only_failing(history) == ["fifo"]


def test_a_lapsed_holder_is_exempt_from_fifo() -> None:
    history = History()
    history.hold("w1", "a", 20, asked=0.0, granted=0.01, released=0.10)
    req = history.hold(
        "w2", "a", 15, asked=0.005, granted=0.20, released=0.30, write=False, lost_at_release=True
    )
    history.add(Event(0.201, LOST, worker="w2", req=req, conv="a", ticket=15))
    history.events = [
        Event(
            e.t,
            e.kind,
            e.worker,
            e.req,
            e.conv,
            e.ticket,
            True if e.req == req and e.lost is False else e.lost,
            e.accepted,
            e.value,
            e.seen,
        )
        for e in history.events
    ]
    assert only_failing(history) == []


def test_a_register_that_lost_a_write_violates_no_lost_update() -> None:
    history = History().clean()
    counts = registers(history)
    counts["a"] -= 1
    result = check(history.events, PARAMS, Outcome(registers=counts))
    assert only_failing(history, Outcome(registers=counts)) == ["no_lost_update"]
    [violation] = result.properties["no_lost_update"].violations
    assert "holds 2 but accepted 3 writes: 1 lost" in violation.message
    assert all(event.kind == WRITE for event in violation.events)


def test_an_unfinished_write_may_count_either_way() -> None:
    history = History().clean()
    history.hold("w3", "a", 13, asked=0.7, granted=0.71, released=None, write=None)
    history.add(Event(0.72, KILL, worker="w3"))
    counts = registers(history)
    assert only_failing(history, Outcome(registers=counts)) == []
    assert only_failing(history, Outcome(registers={**counts, "a": counts["a"] + 1})) == []
    assert only_failing(history, Outcome(registers={**counts, "a": counts["a"] + 2})) == ["no_lost_update"]


def test_a_refused_write_needs_a_higher_ticket_granted_before_it() -> None:
    stale = History()
    stale.hold("w1", "a", 10, asked=0.0, granted=0.01, released=0.10, write=False)
    stale.hold("w2", "a", 9, asked=0.2, granted=0.21, released=0.3, write=True)
    # (ticket 9 after 10 breaks the token rules too; the refusal itself is what matters here)
    result = check(stale.events, PARAMS, Outcome(registers=registers(stale)))
    refusal = [v for v in result.properties["no_lost_update"].violations if "refused" in v.message]
    assert len(refusal) == 1
    assert refusal[0].events[0].ticket == 10
    justified = History()
    justified.hold("w2", "a", 11, asked=0.0, granted=0.01, released=0.05)
    justified.hold("w1", "a", 10, asked=0.0, granted=0.06, released=0.10, write=False, lost_at_release=True)
    result = check(justified.events, PARAMS, Outcome(registers=registers(justified)))
    assert not result.properties["no_lost_update"].violations


def test_a_request_without_an_answer_violates_liveness() -> None:
    history = History().clean()
    history.add(Event(0.7, REQUEST, worker="w1", req="w1:99", conv="a"))
    assert only_failing(history) == ["liveness"]
    slow = History().clean()
    slow.add(Event(0.7, REQUEST, worker="w1", req="w1:99", conv="a"))
    slow.add(
        Event(0.7 + 3.0 + 2.0 + 0.6, ERROR, worker="w1", req="w1:99", conv="a", error="LockTimeoutError")
    )
    assert only_failing(slow) == ["liveness"]
    # The same wait is fine when Redis was restarting for a second of it, or the worker was killed.
    restarted = History().clean()
    restarted.events += slow.events[-2:]
    restarted.add(Event(1.0, RESTART, end=2.0))
    assert only_failing(restarted) == []
    killed = History().clean()
    killed.add(Event(0.7, REQUEST, worker="w9", req="w9:1", conv="a"))
    killed.add(Event(0.8, KILL, worker="w9"))
    assert only_failing(killed) == []


def test_a_ticket_granted_twice_or_reset_violates_tokens_increase() -> None:
    twice = History()
    twice.hold("w1", "a", 10, asked=0.0, granted=0.01, released=0.10)
    twice.hold("w2", "a", 10, asked=0.2, granted=0.21, released=0.30)
    result = check(twice.events, PARAMS, Outcome(registers=registers(twice)))
    assert only_failing(twice) == ["tokens_increase"]
    assert "ticket 10 was granted twice" in result.properties["tokens_increase"].violations[0].message
    reset = History()
    reset.hold("w1", "a", 10, asked=0.0, granted=0.01, released=0.10)
    reset.hold("w2", "a", 3, asked=0.5, granted=0.51, released=0.60)  # e.g. a counter that restarted at idle
    failing = only_failing(reset)
    assert "tokens_increase" in failing
    assert "mutual_exclusion" not in failing


def test_keys_left_behind_violate_no_leftover_keys_and_custom_stores_are_skipped() -> None:
    history = History().clean()
    outcome = Outcome(registers=registers(history), leftover_keys=["convlock:verify:x:lock:{a}:s"])
    assert only_failing(history, outcome) == ["no_leftover_keys"]
    skipped = check(
        history.events,
        PARAMS,
        Outcome(registers=registers(history), leftover_keys=None, leftover_reason="custom store"),
    )
    assert skipped.properties["no_leftover_keys"].status == "skipped"
    assert skipped.ok


def test_faults_are_counted_from_the_history() -> None:
    history = History().clean()
    history.add(Event(0.7, REQUEST, worker="w1", req="w1:50", conv="h:{*}"))
    history.add(Event(0.8, ERROR, worker="w1", req="w1:50", conv="h:{*}", error="cancelled", detail="fault"))
    history.add(Event(0.9, KILL, worker="w2"))
    history.add(Event(1.0, RESTART, end=1.2))
    result = check(
        history.events, PARAMS, Outcome(registers=registers(history), hostile_ids=frozenset({"h:{*}", "x"}))
    )
    assert result.faults == {
        "kill": 1,
        "pause": 0,
        "cancel": 1,
        "restart": 1,
        "hostile-ids": 1,
        "failover": 0,
    }


def test_percentile_is_nearest_rank() -> None:
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0], 0.99) == 2.0
    assert percentile([], 0.5) != percentile([], 0.5)  # NaN
