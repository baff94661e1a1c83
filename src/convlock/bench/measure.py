"""Pure statistics for the bench, and CPU pinning.

Why pinning: on two cores the client and redis-server sometimes share a core
and sometimes do not, and the round-trip floor flips between two modes;
pinning them to different CPUs steadies it. Pinning is best effort: where the
machine has one CPU or forbids it, the run says it was not pinned.
"""

from __future__ import annotations

import contextlib
import os
import statistics
from collections.abc import Sequence

__all__ = ["all_cpus", "median", "percentile", "pin", "unpin"]


def median(values: Sequence[float]) -> float:
    """The median; NaN for no values (a figure that could not be measured shows as such)."""
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def all_cpus() -> set[int]:
    """Every CPU this machine has (not only those this process may use now)."""
    return set(range(os.cpu_count() or 1))


def pin(pid: int, cpu: int) -> bool:
    """Pin ``pid`` (0: this process) to ``cpu`` if the machine has it; True if done."""
    if not hasattr(os, "sched_setaffinity") or cpu not in all_cpus() or len(all_cpus()) < 2:
        return False
    try:
        os.sched_setaffinity(pid, {cpu})
    except OSError:
        return False
    return True


def unpin(pid: int = 0) -> None:
    """Let ``pid`` (0: this process) run on every CPU again."""
    if hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, all_cpus())
