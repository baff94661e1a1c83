"""The loop instruments expose exactly what prometheus-client's own Counter and Histogram would."""

from __future__ import annotations

import random
import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from convlock.instruments import LoopCollector, LoopCounter, LoopHistogram
from convlock.metrics import BUCKETS


def _samples(registry: CollectorRegistry) -> list[str]:
    """Every sample line but the _created ones (their timestamps differ), in order."""
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_the_exposition_matches_prometheus_clients_own() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    counter = Counter("x_messages", "Messages by outcome", ["outcome"], registry=theirs)
    histogram = Histogram("x_seconds", "Call time", ["operation"], buckets=BUCKETS, registry=theirs)
    plain = Histogram("x_handler_seconds", "Handler time", buckets=BUCKETS, registry=theirs)
    loop_counter = LoopCounter("x_messages", "Messages by outcome", ["outcome"])
    loop_histogram = LoopHistogram("x_seconds", "Call time", ["operation"], buckets=BUCKETS)
    loop_plain = LoopHistogram("x_handler_seconds", "Handler time", buckets=BUCKETS)
    ours.register(LoopCollector([loop_counter, loop_histogram, loop_plain]))
    rng = random.Random(3)
    # Values on bucket bounds too: a bound belongs to its own bucket (le = less or equal).
    values = [rng.choice(BUCKETS) for _ in range(200)] + [rng.expovariate(20) for _ in range(800)] + [99.0]
    for value in values:
        operation = rng.choice(["load", "save"])
        histogram.labels(operation).observe(value)
        loop_histogram.labels(operation).observe(value)
        plain.observe(value)
        loop_plain.observe(value)
        outcome = rng.choice(["ok", "stale", "replayed"])
        counter.labels(outcome).inc()
        loop_counter.labels(outcome).inc()
    assert sorted(_samples(ours)) == sorted(_samples(theirs))
    created = [line for line in generate_latest(ours).decode().splitlines() if re.match(r"x_\w+_created", line)]
    assert len(created) == 3 + 2 + 1  # one per series, as prometheus-client writes them


def test_labels_must_match_the_label_names() -> None:
    counter = LoopCounter("y_total", "y", ["a", "b"])
    with pytest.raises(ValueError, match="takes labels"):
        counter.labels("only-one")
    with pytest.raises(ValueError, match="use labels"):
        LoopHistogram("z", "z", ["a"], buckets=BUCKETS).observe(1.0)
