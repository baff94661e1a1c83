"""Prometheus metrics, one registry per app so that apps in one process never mix.

Names (all prefixed ``convlock_``):

* ``http_requests_total{method,route,status}`` and
  ``http_request_duration_seconds{method,route}``: every request, by route
  template (``/locks/{conversation_id}``), so IDs never become labels;
* ``messages_total{outcome}``: webhook messages by outcome: ``ok``,
  ``replayed`` (a remembered message ID), ``abandoned`` (the client had
  gone when the lock was granted), ``stale`` (409), ``handler_timeout`` and
  ``deadline`` (504), ``handler_error`` (500), ``refused`` (501),
  ``lock_timeout``, ``not_replicated``, ``unavailable`` and ``cancelled``
  (503), ``overloaded`` (429: too many messages of one conversation waiting);
* ``messages_in_flight``: messages being processed now;
* the lock store's collectors from :class:`convlock.metrics.LockMetrics`
  (``lock_wait_seconds``, ``lock_hold_seconds``, ``lock_grants_total``,
  ``lock_timeouts_total``, ``lock_lapsed_total``,
  ``lock_revocations_total``, ``lock_store_errors_total``,
  ``lock_waiting_tickets``), fed by the store as its observer;
* ``handler_seconds``: handler wall time;
* ``tracker_seconds{operation}``: tracker ``load`` and ``save`` time;
* ``lock_store_statistic{name}`` and ``tracker_store_statistic{name}``: the
  numeric entries of each store's ``statistics()``, read at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..instruments import CounterChild, HistogramChild, LoopCollector, LoopCounter, LoopHistogram
from ..metrics import BUCKETS, LockMetrics

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"



class _StoreStatistics(Collector):
    """Exposes a store's numeric ``statistics()`` as one gauge family."""

    def __init__(self, name: str, documentation: str, source: Callable[[], Mapping[str, Any] | None]) -> None:
        self._name = name
        self._documentation = documentation
        self._source = source

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self._name, self._documentation, labels=["name"])
        for key, value in sorted((self._source() or {}).items()):
            if isinstance(value, int | float) and not isinstance(value, bool):
                family.add_metric([str(key)], float(value))
        yield family


class ServerMetrics:
    """The app's instruments and their registry; ``render()`` gives the scrape text."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Updated on every request: plain numbers read at scrape time (see convlock.instruments).
        self.requests = LoopCounter(
            "convlock_http_requests",
            "HTTP requests by route template and status",
            ["method", "route", "status"],
        )
        self.request_seconds = LoopHistogram(
            "convlock_http_request_duration_seconds",
            "HTTP request time",
            ["method", "route"],
            buckets=BUCKETS,
        )
        self.messages = LoopCounter("convlock_messages", "Webhook messages by outcome", ["outcome"])
        self.handler_seconds = LoopHistogram(
            "convlock_handler_seconds", "Handler wall time", buckets=BUCKETS
        )
        self.tracker_seconds = LoopHistogram(
            "convlock_tracker_seconds", "Tracker store call time", ["operation"], buckets=BUCKETS
        )
        per_request = (self.requests, self.request_seconds, self.messages)
        r.register(LoopCollector((*per_request, self.handler_seconds, self.tracker_seconds)))
        self.in_flight = Gauge("convlock_messages_in_flight", "Messages being processed", registry=r)
        #: The same collectors a library user registers; build_app attaches them to the lock store.
        #: The app's stores run on its one event loop, so plain numbers do.
        self.locks = LockMetrics(registry=r, one_loop=True)
        # (method, route, status) -> its counter and histogram children, one lookup per request.
        self._request_children: dict[tuple[str, str, int], tuple[CounterChild, HistogramChild]] = {}
        self._lock_stats: Callable[[], Mapping[str, Any]] | None = None
        self._tracker_stats: Callable[[], Mapping[str, Any]] | None = None
        r.register(
            _StoreStatistics(
                "convlock_lock_store_statistic",
                "Numeric statistics() of the lock store",
                lambda: self._lock_stats() if self._lock_stats else None,
            )
        )
        r.register(
            _StoreStatistics(
                "convlock_tracker_store_statistic",
                "Numeric statistics() of the tracker store",
                lambda: self._tracker_stats() if self._tracker_stats else None,
            )
        )

    def bind_stores(
        self, lock_stats: Callable[[], Mapping[str, Any]], tracker_stats: Callable[[], Mapping[str, Any]]
    ) -> None:
        """Read store statistics from these callables at each scrape."""
        self._lock_stats = lock_stats
        self._tracker_stats = tracker_stats

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished HTTP request."""
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(method, route, str(status)),
                self.request_seconds.labels(method, route),
            )
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
