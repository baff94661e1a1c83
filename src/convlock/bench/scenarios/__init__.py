"""The scenarios of ``convlock bench``, one module per family, and what they share (:class:`Context`).

Every scenario is a function ``run(ctx)`` that adds figures (or stated
skips) to ``ctx.results``; ``--quick`` shrinks the workloads, never the
kind of comparison, so CI checks that every scenario produces numbers.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..procs import RedisTarget, Worker
from ..report import Results

__all__ = ["SCENARIOS", "Context", "Scenario", "select"]


@dataclass
class Context:
    """What a scenario may use: the run's options, its Redis, its worker processes, its results."""

    quick: bool
    work: Path
    results: Results
    target: RedisTarget | None = None
    prefix: str = field(default_factory=lambda: f"convlock-bench-{os.getpid()}")
    _workers: list[Worker] = field(default_factory=list)
    _started: float = field(default_factory=time.monotonic)

    def progress(self, message: str) -> None:
        """One line on stderr, with the seconds since the run began."""
        print(f"[{time.monotonic() - self._started:6.1f}s] {message}", file=sys.stderr, flush=True)

    def redis(self) -> RedisTarget:
        """The Redis to measure (the run starts one unless --endpoints named one)."""
        if self.target is None:
            raise RuntimeError("this scenario needs Redis, and the run has none")
        return self.target

    def workers(self, count: int) -> list[Worker]:
        """``count`` worker processes, started on first use and kept for the run."""
        # Start them all, then wait: their imports overlap.
        first = len(self._workers)
        started = [Worker(self.work / f"worker-{index}.log", wait=False) for index in range(first, count)]
        self._workers += started
        for worker in started:
            worker.wait_ready()
        return self._workers[:count]

    def close(self) -> None:
        """Stop the workers."""
        for worker in self._workers:
            worker.stop()
        self._workers.clear()


@dataclass(frozen=True)
class Scenario:
    """One numbered scenario of the issue: its id, title, whether it needs Redis, and its code."""

    number: int
    name: str
    title: str
    needs_redis: bool
    run: Callable[[Context], None]


def _scenarios() -> list[Scenario]:
    from . import handoff, lock_memory, lock_redis, rasa, server

    return [
        Scenario(1, "memory-uncontended", "1 memory uncontended", False, lock_memory.uncontended),
        Scenario(2, "memory-contended", "2 memory contended", False, lock_memory.contended),
        Scenario(3, "redis-cycle", "3 Redis cycle", True, lock_redis.cycle),
        Scenario(4, "handoff", "4 Redis hand-off", True, handoff.run),
        Scenario(5, "throughput", "5 Redis throughput", True, lock_redis.throughput),
        Scenario(6, "footprint", "6 Redis commands & memory", True, lock_redis.footprint),
        Scenario(7, "server", "7 convlock run", True, server.run),
        Scenario(8, "rasa", "8 Rasa lock stores", True, rasa.run),
        Scenario(9, "listing", "9 locks ls", True, lock_redis.listing),
        Scenario(10, "burst", "10 Redis burst", True, lock_redis.burst),
    ]


SCENARIOS: list[Scenario] = _scenarios()


def select(spec: str | None) -> list[Scenario]:
    """The scenarios named in ``spec`` (numbers or names, comma-separated); all when None."""
    if not spec:
        return list(SCENARIOS)
    chosen: list[Scenario] = []
    for item in (part.strip() for part in spec.split(",")):
        match = [s for s in SCENARIOS if item in (str(s.number), s.name)]
        if not match:
            names = ", ".join(f"{s.number}={s.name}" for s in SCENARIOS)
            raise ValueError(f"--scenarios: unknown scenario {item!r}; choose from {names}")
        chosen.extend(s for s in match if s not in chosen)
    return sorted(chosen, key=lambda s: s.number)
