"""Scenario 4: hand-off latency between 2, 4 and 8 processes on one lock, ours against other Redis locks.

Each worker process takes the lock ``rounds`` times, holds it 1 ms, releases
it and asks again at once. A *hand-off* is a grant to a different process
than the one that just released; its latency is the time from the start of
that release to the grant, both on the host-wide monotonic clock. Reported:
p50/p99/max of hand-off latencies, and the share of releases that went to a
waiting process rather than back to the releaser (a FIFO lock hands every
one over: target 1.0 for convlock). redis-py's ``Lock`` polls every 0.1 s
(its default) and ``python-redis-lock`` waits on ``BLPOP``; neither queues,
so a releaser often takes its own lock back. Libraries alternate per round
of repeats, so drift spreads over all of them.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from ..measure import percentile
from ..procs import run_all
from ..report import Figure, Target
from . import Context
from .lock_redis import MISSING_PRL, _import_python_redis_lock

__all__ = ["run", "summarise"]

HOLD = 0.001
PROCESS_COUNTS = (2, 4, 8)


def summarise(holds: list[list[float]]) -> tuple[list[float], float]:
    """Hand-off latencies (seconds) and the share of releases that went to another process.

    ``holds`` are ``[granted, release_started, pid]`` from every process; the
    first few of the run are dropped (start-up skew between processes).
    """
    ordered = sorted(holds)[5:]
    pairs = list(itertools.pairwise(ordered))
    handed = [(a, b) for a, b in pairs if a[2] != b[2]]
    latencies = [b[0] - a[1] for a, b in handed]
    return latencies, (len(handed) / len(pairs) if pairs else float("nan"))


def run(ctx: Context) -> None:
    """Scenario 4 (see the module docstring)."""
    target = ctx.redis()
    libs = ["convlock", "redis-py"]
    if _import_python_redis_lock() is not None:
        libs.append("python-redis-lock")
    else:
        ctx.results.skip("handoff", "against python-redis-lock", MISSING_PRL)
    rounds = 15 if ctx.quick else 100
    repeats = 1 if ctx.quick else 3
    deadline = 10.0 if ctx.quick else 60.0
    # The workers are warm and connected by then; --quick needs no margin for a busy machine.
    lead = 0.2 if ctx.quick else 0.4
    latencies: dict[str, dict[str, list[float]]] = {lib: {} for lib in libs}
    shares: dict[str, dict[str, list[float]]] = {lib: {} for lib in libs}
    workers = ctx.workers(max(PROCESS_COUNTS))
    for repeat in range(repeats):
        for processes in PROCESS_COUNTS:
            for lib in libs:
                ctx.progress(f"hand-off: {lib}, {processes} processes (repeat {repeat + 1}/{repeats})")
                command: dict[str, Any] = {
                    "op": "handoff", "lib": lib, "url": target.url, "prefix": ctx.prefix,
                    "name": f"handoff-{lib}-{processes}-{repeat}", "rounds": rounds, "hold": HOLD,
                    "deadline": deadline, "start_at": time.monotonic() + lead,
                }
                answers = run_all(workers[:processes], [command] * processes)
                found, share = summarise([hold for answer in answers for hold in answer])
                latencies[lib].setdefault(str(processes), []).extend(found)
                shares[lib].setdefault(str(processes), []).append(share)
    ctx.results.series["handoff_ms"] = {
        lib: {count: [x * 1000 for x in values] for count, values in per.items()}
        for lib, per in latencies.items()
    }
    add = ctx.results.add
    for count in (str(c) for c in PROCESS_COUNTS):
        ours = latencies["convlock"][count]
        ours_share = sum(shares["convlock"][count]) / len(shares["convlock"][count])
        add(Figure("handoff", f"{count} processes: p50", percentile(ours, 0.5) * 1000, "ms"))
        add(Figure("handoff", f"{count} processes: p99", percentile(ours, 0.99) * 1000, "ms",
                   # 1 ms for two processes (the burst issue's bound); more
                   # processes share two cores here, so 2 ms for them.
                   target=Target("<=", 1 if count == "2" else 2, on="value"), note=f"{len(ours)} hand-offs"))
        add(Figure("handoff", f"{count} processes: max", max(ours, default=float("nan")) * 1000, "ms"))
        add(Figure("handoff", f"{count} processes: share to a waiting process", ours_share, "",
                   target=Target(">=", 0.99, on="value")))
        for lib in libs[1:]:
            theirs = latencies[lib][count]
            share = sum(shares[lib][count]) / len(shares[lib][count])
            if not theirs:
                ctx.results.skip("handoff", f"{count} processes: latency against {lib}",
                                 f"no hand-off seen: every release of {lib} went back to the releaser")
                continue
            for label, fraction in (("p50", 0.5), ("p99", 0.99)):
                add(Figure("handoff", f"{count} processes: {label}", percentile(ours, fraction) * 1000, "ms",
                           percentile(theirs, fraction) * 1000, lib,
                           note=f"{len(theirs)} {lib} hand-offs"))
            add(Figure("handoff", f"{count} processes: share to a waiting process", ours_share, "",
                       share, lib))
