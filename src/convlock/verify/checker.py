"""The checker: a pure function from a run's history to the properties that held or failed.

:func:`check` reads nothing and writes nothing; it takes the events (see
:mod:`convlock.verify.history`) and what was observed after the run (the
registers' final values, the store keys left over) and returns a
:class:`CheckResult` in which every violation carries the events that show it.

Holds and lapses
----------------
A *hold* is a granted request. Its measured interval starts when the grant was
known and ends at the last moment the holder saw ``held.lost`` false (each
worker event inside a hold records ``held.lost`` at its time). A store
promises that ``held.lost`` false means the lease is still valid, so a hold is
*un-lapsed* over that interval, and mutual exclusion is checked over
un-lapsed intervals only: a holder paused past its lease, or one whose
renewals could not reach Redis, has lapsed and may legally be overlapped.

A hold that ends without a release (its worker was killed, or stopped) is
given one more piece of certainty: its lease began no earlier than its
request was sent, so it was valid until at least ``request + lifetime``
(less a small clock tolerance), unless the holder released it or saw it
lost before that. A store that grants a killed holder's conversation before
that moment is caught.

Properties
----------
``mutual_exclusion``  no two un-lapsed holds of one conversation overlap.
``fifo``              among holds that did not lapse, grants follow ticket
                      order. Cancelled and timed-out tickets are never
                      granted, and a waiter whose own waiting lease lapsed
                      draws a new ticket, so they cannot appear here.
``no_lost_update``    each register equals the number of writes it accepted
                      (a write whose outcome was never seen, because its worker
                      died, may count either way), and every refused write
                      came from a stale ticket: one lower than a ticket granted
                      before the refusal.
``liveness``          every request ends in a grant or an error within
                      ``wait_timeout + lifetime + slack``, not counting time
                      its worker spent stopped or Redis spent restarting or
                      failing over;
                      requests of killed workers are exempt.
``tokens_increase``   per conversation, no ticket is granted twice, and a
                      request sent after a grant gets a higher ticket.
``no_leftover_keys``  no key of the store is left after the run (checked for
                      the built-in stores only).

Open question: FIFO is checked in grant order, since the lock API does not
tell a caller when its ticket was drawn; a store that numbers tickets at
grant time rather than at draw time would pass it (but not the others, as a
rule).
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .history import (
    ERROR,
    FAILOVER,
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

__all__ = [
    "FAULTS",
    "PROPERTIES",
    "CheckParams",
    "CheckResult",
    "Hold",
    "Outcome",
    "PropertyResult",
    "Violation",
    "check",
    "percentile",
]

PROPERTIES = (
    "mutual_exclusion",
    "fifo",
    "no_lost_update",
    "liveness",
    "tokens_increase",
    "no_leftover_keys",
)
FAULTS = ("kill", "pause", "cancel", "restart", "hostile-ids", "failover")

#: Events inside a hold that record ``held.lost`` at their time.
_CHECKPOINTS = frozenset({GRANT, READ, WRITE_START, RELEASE})


@dataclass(frozen=True, slots=True)
class CheckParams:
    """What the run promised to the checker.

    ``lifetime`` and ``wait_timeout`` are the values every ``lock()`` call
    used. ``slack`` is the scheduling noise allowed on top of the liveness
    bound; ``clock_tolerance`` is subtracted from lease bounds derived from
    the request time.
    """

    lifetime: float
    wait_timeout: float
    slack: float = 1.0
    clock_tolerance: float = 0.05


@dataclass(frozen=True, slots=True)
class Outcome:
    """What was observed after the run.

    ``registers`` maps conversation IDs to the register's final value (a
    conversation missing from it counts as 0); ``leftover_keys`` lists the
    store's keys still present, or is None when they could not be checked
    (``leftover_reason`` says why). ``hostile_ids`` are the conversation IDs
    that the hostile-ids fault added.
    """

    registers: Mapping[str, int]
    leftover_keys: Sequence[str] | None = ()
    leftover_reason: str = ""
    hostile_ids: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Violation:
    """One violation of ``property``: what is wrong, and the events that show it."""

    property: str
    message: str
    events: tuple[Event, ...]


@dataclass(slots=True)
class PropertyResult:
    """The verdict on one property: ``checked`` counts what was examined."""

    name: str
    checked: int = 0
    violations: list[Violation] = field(default_factory=list)
    skipped: str | None = None

    @property
    def status(self) -> str:
        """``pass``, ``fail`` or ``skipped``."""
        if self.violations:
            return "fail"
        return "skipped" if self.skipped is not None else "pass"


@dataclass(slots=True)
class Hold:
    """One granted request, with the interval over which it was surely un-lapsed."""

    req: str
    worker: str
    conv: str
    ticket: int
    requested: float
    granted: float
    ok_until: float  # < granted: the hold was never seen un-lapsed
    released: float | None
    lapsed: bool
    grant_event: Event


@dataclass(slots=True)
class CheckResult:
    """Every property's verdict, plus the run's figures."""

    properties: dict[str, PropertyResult]
    requests: int
    grants: int
    faults: dict[str, int]
    kills_while_holding: int
    handoffs: list[float]
    holds: list[Hold]

    @property
    def violation_counts(self) -> dict[str, int]:
        """Each property's number of violations."""
        return {name: len(result.violations) for name, result in self.properties.items()}

    @property
    def ok(self) -> bool:
        """True when no property was violated."""
        return not any(self.violation_counts.values())


@dataclass(slots=True)
class _Request:
    request: Event
    events: list[Event] = field(default_factory=list)
    grant: Event | None = None
    error: Event | None = None


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by the nearest-rank method; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _overlap(start: float, end: float, windows: Iterable[tuple[float, float]]) -> float:
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in windows)


def check(events: Iterable[Event], params: CheckParams, outcome: Outcome) -> CheckResult:
    """Check every property over ``events`` (any order) and ``outcome``; pure."""
    ordered = sorted(events, key=lambda event: event.t)
    requests: dict[str, _Request] = {}
    killed: dict[str, Event] = {}
    stopped: dict[str, list[tuple[float, float]]] = defaultdict(list)
    restarts: list[tuple[float, float]] = []
    faults = dict.fromkeys(FAULTS, 0)
    kills_holding = 0
    for event in ordered:
        kind = event.kind
        if kind == REQUEST:
            requests[event.req] = _Request(event, [event])
        elif event.req in requests and kind != REQUEST:
            entry = requests[event.req]
            entry.events.append(event)
            if kind == GRANT and entry.grant is None and entry.error is None:
                entry.grant = event
            elif kind == ERROR and entry.grant is None and entry.error is None:
                entry.error = event
                if event.error == "cancelled" and event.detail == "fault":
                    faults["cancel"] += 1
        elif kind == KILL:
            killed.setdefault(event.worker, event)
            if event.detail != "shutdown":  # a worker that would not stop at the end is no fault
                faults["kill"] += 1
                kills_holding += event.detail == "holding"
        elif kind == PAUSE:
            faults["pause"] += 1
            stopped[event.worker].append((event.t, event.end if event.end is not None else math.inf))
        elif kind == HOLD_STOP:
            stopped[event.worker].append((event.t, event.end if event.end is not None else math.inf))
        elif kind == RESTART:
            faults["restart"] += 1
            restarts.append((event.t, event.end if event.end is not None else event.t))
        elif kind == FAILOVER:
            faults["failover"] += 1
            restarts.append((event.t, event.end if event.end is not None else event.t))
    # A CANCEL event says a signal was sent; the fault counted is each waiter it cancelled.
    faults["hostile-ids"] = len(
        {entry.request.conv for entry in requests.values() if entry.request.conv in outcome.hostile_ids}
    )

    holds = [_hold(entry, params, killed) for entry in requests.values() if entry.grant is not None]
    by_conv: dict[str, list[Hold]] = defaultdict(list)
    for hold in holds:
        by_conv[hold.conv].append(hold)
    for conv_holds in by_conv.values():
        conv_holds.sort(key=lambda hold: hold.granted)

    properties = {
        "mutual_exclusion": _mutual_exclusion(by_conv),
        "fifo": _fifo(by_conv),
        "no_lost_update": _no_lost_update(requests.values(), by_conv, outcome),
        "liveness": _liveness(requests.values(), params, killed, stopped, restarts),
        "tokens_increase": _tokens(by_conv),
        "no_leftover_keys": _leftover(outcome),
    }
    return CheckResult(
        properties=properties,
        requests=len(requests),
        grants=len(holds),
        faults=faults,
        kills_while_holding=kills_holding,
        handoffs=_handoffs(by_conv),
        holds=holds,
    )


def _hold(entry: _Request, params: CheckParams, killed: Mapping[str, Event]) -> Hold:
    grant = entry.grant
    assert grant is not None
    assert grant.ticket is not None
    after = [event for event in entry.events if event.t >= grant.t]
    ok_times = [event.t for event in after if event.kind in _CHECKPOINTS and event.lost is False]
    lost_times = [event.t for event in after if event.kind == LOST or event.lost is True]
    releases = [event.t for event in after if event.kind == RELEASE]
    released = releases[0] if releases else None
    ok_until = max(ok_times, default=-math.inf)
    if released is None or lost_times:
        # Released holds end at their release. Otherwise the lease, which began
        # after the request was sent, lasted at least `lifetime` from then,
        # unless the holder saw it lost earlier.
        sure = min(
            entry.request.t + params.lifetime - params.clock_tolerance,
            min(lost_times, default=math.inf),
            released if released is not None else math.inf,
        )
        if released is None and grant.worker not in killed and not lost_times:
            sure = -math.inf  # neither released nor killed: nothing more is known
        if sure > grant.t:
            ok_until = max(ok_until, sure)
    return Hold(
        req=entry.request.req,
        worker=grant.worker,
        conv=grant.conv,
        ticket=grant.ticket,
        requested=entry.request.t,
        granted=grant.t,
        ok_until=ok_until,
        released=released,
        lapsed=bool(lost_times),
        grant_event=grant,
    )


def _mutual_exclusion(by_conv: Mapping[str, list[Hold]]) -> PropertyResult:
    result = PropertyResult("mutual_exclusion")
    for conv, conv_holds in by_conv.items():
        live = [hold for hold in conv_holds if hold.ok_until >= hold.granted]
        result.checked += len(live)
        widest: Hold | None = None
        for hold in live:
            if widest is not None and hold.granted < widest.ok_until:
                result.violations.append(
                    Violation(
                        "mutual_exclusion",
                        f"conversation {_name(conv)}: ticket {hold.ticket} was granted to {hold.worker} "
                        f"while ticket {widest.ticket} of {widest.worker} was held and un-lapsed "
                        f"(overlap {1000 * (widest.ok_until - hold.granted):.1f} ms)",
                        (widest.grant_event, hold.grant_event),
                    )
                )
            if widest is None or hold.ok_until > widest.ok_until:
                widest = hold
    return result


def _fifo(by_conv: Mapping[str, list[Hold]]) -> PropertyResult:
    result = PropertyResult("fifo")
    for conv, conv_holds in by_conv.items():
        highest: Hold | None = None
        for hold in conv_holds:
            if hold.lapsed:
                continue
            result.checked += 1
            if highest is not None and hold.ticket < highest.ticket:
                result.violations.append(
                    Violation(
                        "fifo",
                        f"conversation {_name(conv)}: ticket {hold.ticket} was granted after the later "
                        f"ticket {highest.ticket}",
                        (highest.grant_event, hold.grant_event),
                    )
                )
            if highest is None or hold.ticket > highest.ticket:
                highest = hold
    return result


def _tokens(by_conv: Mapping[str, list[Hold]]) -> PropertyResult:
    result = PropertyResult("tokens_increase")
    for conv, conv_holds in by_conv.items():
        first: dict[int, Hold] = {}
        for hold in conv_holds:
            result.checked += 1
            if hold.ticket in first:
                other = first[hold.ticket]
                result.violations.append(
                    Violation(
                        "tokens_increase",
                        f"conversation {_name(conv)}: ticket {hold.ticket} was granted twice "
                        f"({other.worker} and {hold.worker})",
                        (other.grant_event, hold.grant_event),
                    )
                )
            else:
                first[hold.ticket] = hold
        # A request sent after a grant must get a higher ticket than it.
        by_request = sorted(conv_holds, key=lambda hold: hold.requested)
        best: Hold | None = None
        index = 0
        for hold in by_request:
            while index < len(conv_holds) and conv_holds[index].granted < hold.requested:
                candidate = conv_holds[index]
                if best is None or candidate.ticket > best.ticket:
                    best = candidate
                index += 1
            if best is not None and hold.ticket < best.ticket:
                result.violations.append(
                    Violation(
                        "tokens_increase",
                        f"conversation {_name(conv)}: ticket {hold.ticket} was granted to a request sent "
                        f"after ticket {best.ticket} had been granted",
                        (best.grant_event, hold.grant_event),
                    )
                )
    return result


def _no_lost_update(
    requests: Iterable[_Request], by_conv: Mapping[str, list[Hold]], outcome: Outcome
) -> PropertyResult:
    result = PropertyResult("no_lost_update")
    accepted: dict[str, list[Event]] = defaultdict(list)
    unknown: dict[str, int] = defaultdict(int)
    refused: list[Event] = []
    for entry in requests:
        started = [event for event in entry.events if event.kind == WRITE_START]
        done = [event for event in entry.events if event.kind == WRITE]
        conv = entry.request.conv
        unknown[conv] += max(0, len(started) - len(done))
        for event in done:
            if event.accepted:
                accepted[conv].append(event)
            else:
                refused.append(event)
    for conv in sorted(set(accepted) | set(unknown) | set(outcome.registers)):
        value = outcome.registers.get(conv, 0)
        writes = accepted.get(conv, [])
        result.checked += 1
        if value < len(writes):
            result.violations.append(
                Violation(
                    "no_lost_update",
                    f"conversation {_name(conv)}: the register holds {value} but accepted "
                    f"{len(writes)} writes: {len(writes) - value} lost",
                    tuple(writes[-5:]),
                )
            )
        elif value > len(writes) + unknown.get(conv, 0):
            result.violations.append(
                Violation(
                    "no_lost_update",
                    f"conversation {_name(conv)}: the register holds {value}, more than its "
                    f"{len(writes)} accepted and {unknown.get(conv, 0)} unfinished writes",
                    tuple(writes[-5:]),
                )
            )
    # A refused write must come from a stale ticket: a higher one was granted before the refusal.
    grants_by_conv = {
        conv: ([hold.granted for hold in holds], _running_max([hold.ticket for hold in holds]))
        for conv, holds in by_conv.items()
    }
    for event in refused:
        result.checked += 1
        times, highest = grants_by_conv.get(event.conv, ([], []))
        index = bisect_left(times, event.t)
        top = highest[index - 1] if index else None
        if event.ticket is None or top is None or top <= event.ticket:
            result.violations.append(
                Violation(
                    "no_lost_update",
                    f"conversation {_name(event.conv)}: a write with ticket {event.ticket} was refused "
                    f"though no higher ticket had been granted (highest so far: {top})",
                    (event,),
                )
            )
    return result


def _running_max(values: Sequence[int]) -> list[int]:
    out: list[int] = []
    for value in values:
        out.append(value if not out else max(out[-1], value))
    return out


def _liveness(
    requests: Iterable[_Request],
    params: CheckParams,
    killed: Mapping[str, Event],
    stopped: Mapping[str, list[tuple[float, float]]],
    restarts: Sequence[tuple[float, float]],
) -> PropertyResult:
    result = PropertyResult("liveness")
    bound = params.wait_timeout + params.lifetime + params.slack
    for entry in requests:
        request = entry.request
        end_event = entry.grant or entry.error
        kill = killed.get(request.worker)
        if end_event is None:
            if kill is not None and kill.t >= request.t:
                continue  # its worker died first
            result.checked += 1
            result.violations.append(
                Violation(
                    "liveness",
                    f"conversation {_name(request.conv)}: request {request.req} never ended in a grant "
                    "or an error",
                    (request,),
                )
            )
            continue
        result.checked += 1
        pauses = _overlap(request.t, end_event.t, stopped.get(request.worker, ()))
        down = _overlap(request.t, end_event.t, restarts)
        waited = end_event.t - request.t - pauses - down
        if waited > bound:
            result.violations.append(
                Violation(
                    "liveness",
                    f"conversation {_name(request.conv)}: request {request.req} took {waited:.2f} s "
                    f"(stops and restarts excluded) to end in a {end_event.kind}, over the bound of "
                    f"{bound:g} s (wait_timeout + lifetime + slack)",
                    (request, end_event),
                )
            )
    return result


def _leftover(outcome: Outcome) -> PropertyResult:
    result = PropertyResult("no_leftover_keys")
    if outcome.leftover_keys is None:
        result.skipped = outcome.leftover_reason or "not checked"
        return result
    result.checked = 1
    if outcome.leftover_keys:
        keys = list(outcome.leftover_keys)
        shown = ", ".join(_name(key) for key in keys[:10])
        result.violations.append(
            Violation(
                "no_leftover_keys",
                f"{len(keys)} key(s) of the store were left after the run: {shown}",
                (),
            )
        )
    return result


def _handoffs(by_conv: Mapping[str, list[Hold]]) -> list[float]:
    """Seconds from a release to the grant of a request that was already waiting for it."""
    out = []
    for conv_holds in by_conv.values():
        for before, after in itertools.pairwise(conv_holds):
            if before.released is None or before.lapsed:
                continue
            if after.requested < before.released <= after.granted:
                out.append(after.granted - before.released)
    return out


def _name(text: str, limit: int = 40) -> str:
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"... ({len(text.encode())} bytes)"
