"""Prometheus collectors for lock stores, usable by any process, not only the server.

Usage::

    from convlock.metrics import LockMetrics

    metrics = LockMetrics()          # registers with prometheus_client's default registry
    store.add_observer(metrics)      # the store now feeds the collectors

Metrics (no label carries a conversation ID, so series do not grow with
conversations):

* ``convlock_lock_wait_seconds`` (histogram): from drawing a ticket to
  holding the lock, for every grant (0 for an in-memory grant at once);
* ``convlock_lock_hold_seconds`` (histogram): from holding the lock to
  leaving the ``async with`` block;
* ``convlock_lock_grants_total``, ``convlock_lock_timeouts_total``,
  ``convlock_lock_lapsed_total`` (holders that found their lease gone),
  ``convlock_lock_revocations_total`` (operator revocations made through
  this process's store) and ``convlock_lock_store_errors_total`` (counters);
* ``convlock_lock_waiting_tickets`` (gauge): tickets of this process waiting now.

Each process counts what its own stores saw; add the series across
processes in Prometheus.

``LockMetrics(one_loop=True)`` keeps the counters and histograms as plain
numbers (:mod:`convlock.instruments`) instead of prometheus-client's
instruments, which take a lock on every update so that threads may share
them: for a process whose stores all run on one event-loop thread, such as
the server. Its scrape reads the same.

``prometheus-client`` is imported only when this module is, so the core
library does not need it unless metrics are used (it may live in an extra
such as ``convlock[server]``). The server builds one ``LockMetrics`` on its
own registry and attaches it to its lock store: it uses these same
collectors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from .observe import AbandonReason, GrantReason, LockObserver

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["BUCKETS", "LockMetrics"]

#: Latencies from a fraction of a millisecond (in-memory lock) to a minute (a stuck holder).
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Name and help text of the histograms (wait, hold) and counters (grants,
# timeouts, lapses, revocations, store errors), in LockMetrics' attribute order.
_HISTOGRAMS = (
    ("convlock_lock_wait_seconds", "From drawing a ticket to holding the lock"),
    ("convlock_lock_hold_seconds", "From holding the lock to leaving the lock block"),
)
_COUNTERS = (
    ("convlock_lock_grants", "Tickets granted"),
    ("convlock_lock_timeouts", "Waits given up because wait_timeout passed"),
    ("convlock_lock_lapsed", "Holders that found their lease lapsed or revoked"),
    ("convlock_lock_revocations", "Tickets revoked by an operator through this process"),
    ("convlock_lock_store_errors", "Lock store calls that failed (LockStoreUnavailable)"),
)


class LockMetrics(LockObserver):
    """The lock collectors, fed as a store's observer (``store.add_observer(metrics)``).

    ``registry`` defaults to prometheus_client's global ``REGISTRY``; pass
    your own for isolation (two ``LockMetrics`` cannot share a registry, as
    the names would clash). One ``LockMetrics`` may observe several stores:
    their events add up.

    ``one_loop=True`` promises that every store it observes runs on one
    event-loop thread; it then counts in plain numbers, without
    prometheus-client's per-update locks (three per lock cycle: ``convlock
    run`` in memory went from 112-115 to 104-105 us of CPU per message). Leave it False
    where stores run on several threads: their updates could be lost.
    """

    __slots__ = (
        "grants",
        "hold",
        "lapses",
        "registry",
        "revocations",
        "store_errors",
        "timeouts",
        "wait",
        "waiting_tickets",
    )

    wait: _Histogram
    hold: _Histogram
    grants: _Counter
    timeouts: _Counter
    lapses: _Counter
    revocations: _Counter
    store_errors: _Counter

    def __init__(self, registry: CollectorRegistry | None = None, *, one_loop: bool = False) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        r = REGISTRY if registry is None else registry
        self.registry = r
        if one_loop:
            from .instruments import LoopCollector, LoopCounter, LoopHistogram

            families: list[LoopHistogram | LoopCounter] = [
                LoopHistogram(name, text, buckets=BUCKETS) for name, text in _HISTOGRAMS
            ]
            families += [LoopCounter(name, text) for name, text in _COUNTERS]
            r.register(LoopCollector(families))
            series: list[Any] = [family.labels() for family in families]
        else:
            series = [Histogram(name, text, buckets=BUCKETS, registry=r) for name, text in _HISTOGRAMS]
            series += [Counter(name, text, registry=r) for name, text in _COUNTERS]
        self.wait, self.hold = series[:2]
        self.grants, self.timeouts, self.lapses, self.revocations, self.store_errors = series[2:]
        self.waiting_tickets = Gauge(
            "convlock_lock_waiting_tickets", "Tickets of this process waiting for a lock now", registry=r
        )

    def waiting(self, conversation_id: str, ticket: int) -> None:
        self.waiting_tickets.inc()

    def granted(self, conversation_id: str, ticket: int, waited: float, reason: GrantReason) -> None:
        if reason != "immediate":
            self.waiting_tickets.dec()
        self.grants.inc()
        self.wait.observe(waited)

    def released(self, conversation_id: str, ticket: int, held: float) -> None:
        self.hold.observe(held)

    def timed_out(self, conversation_id: str, ticket: int, waited: float) -> None:
        self.waiting_tickets.dec()
        self.timeouts.inc()

    def abandoned(self, conversation_id: str, ticket: int, waited: float, reason: AbandonReason) -> None:
        self.waiting_tickets.dec()

    def lapsed(self, conversation_id: str, ticket: int) -> None:
        self.lapses.inc()

    def revoked(self, conversation_id: str, ticket: int, *, holder: bool) -> None:
        self.revocations.inc()

    def store_error(self, error: BaseException) -> None:
        self.store_errors.inc()


class _Counter(Protocol):
    def inc(self, amount: float = 1.0) -> None: ...


class _Histogram(Protocol):
    def observe(self, amount: float) -> None: ...
