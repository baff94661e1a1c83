"""Which faults verify injects, and when: a schedule drawn from ``--seed``.

:func:`plan_faults` is pure: the same seed, fault list, duration and process
count give the same schedule, so a failing run can be repeated (the workers'
interleavings still differ; the schedule does not). Every requested fault
that is scheduled at all appears at least once, early enough to finish
before the run ends: a pause lasts a lease and a half.

``hostile-ids`` is not an event but a change to the conversations the
workers pick from (:data:`HOSTILE_IDS`). ``restart`` needs a standalone
Redis that verify spawned, ``failover`` the Sentinel setup of
``--spawn-redis sentinel``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..ids import MAX_CONVERSATION_ID_BYTES

__all__ = ["ALL_FAULTS", "HOSTILE_IDS", "SCHEDULED", "PlannedFault", "parse_faults", "plan_faults"]

ALL_FAULTS = ("kill", "pause", "cancel", "restart", "hostile-ids", "failover")
#: The faults that happen at a moment of the run.
SCHEDULED = ("kill", "pause", "cancel", "restart", "failover")

#: Conversation IDs that break naive key schemes: separators, glob and hash-tag
#: characters, escapes, non-ASCII text, white space, and lengths at the limit.
HOSTILE_IDS: tuple[str, ...] = (
    "verify:with:colons",
    "*",
    "glob[ab]?*",
    "{hash-tag}",
    "}{",
    "%41%zz%",
    "ünïcødé 会話 🔒",
    " white\tspace\n",
    "a" * MAX_CONVERSATION_ID_BYTES,
    "é" * ((MAX_CONVERSATION_ID_BYTES - 1) // 2) + "x",  # 4095 bytes of two-byte characters
    "{" * (MAX_CONVERSATION_ID_BYTES - 4) + "🔒",  # exactly 4096 bytes, ending in a four-byte character
)


@dataclass(frozen=True, slots=True)
class PlannedFault:
    """One fault: ``kind`` at ``at`` seconds into the run, aimed at worker slot ``worker``.

    ``holding`` asks for a kill while the worker holds a lock (it is stopped
    at its next grant first).
    """

    at: float
    kind: str
    worker: int
    holding: bool = False


def parse_faults(text: str, *, spawn: bool, sentinel: bool = False) -> tuple[str, ...]:
    """The ``--faults`` list as a tuple; raise ``ValueError`` with the fix for a bad one."""
    if text.strip().lower() == "none":
        return ()
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError("--faults: give a comma-separated list such as kill,pause or 'none'")
    for name in names:
        if name not in ALL_FAULTS:
            raise ValueError(
                f"--faults: unknown fault {name!r}; choose from {', '.join(ALL_FAULTS)} or 'none'"
            )
    if "restart" in names and (not spawn or sentinel):
        raise ValueError(
            "--faults restart restarts the standalone Redis that verify spawned: use it with --spawn-redis "
            "(with --spawn-redis sentinel, use failover), or drop restart (verify never restarts a Redis "
            "it does not own)"
        )
    if "failover" in names and not sentinel:
        raise ValueError(
            "--faults failover forces failovers of a Sentinel setup that verify starts itself: add "
            "--spawn-redis sentinel, or drop failover"
        )
    return tuple(dict.fromkeys(names))


def plan_faults(
    seed: int, faults: tuple[str, ...], *, duration: float, lifetime: float, processes: int
) -> list[PlannedFault]:
    """A schedule of the moment faults in ``faults``, sorted by time.

    About one fault every 1.5 s, each kind at least once; all start between
    10% and 75% of the run, so that the last pause (a lease and a half) ends
    before the workers are stopped.
    """
    kinds = [kind for kind in SCHEDULED if kind in faults]
    if not kinds:
        return []
    rng = random.Random(seed)
    count = max(len(kinds), int(duration / 1.5))
    chosen = kinds + [rng.choice(kinds) for _ in range(count - len(kinds))]
    rng.shuffle(chosen)
    latest = max(0.1 * duration, min(0.75 * duration, duration - 1.5 * lifetime - 1.0))
    times = sorted(rng.uniform(0.1 * duration, latest) for _ in chosen)
    plan = []
    first_kill = True
    for at, kind in zip(times, chosen, strict=True):
        # The first kill always hits a holder; later ones do half the time.
        holding = kind == "kill" and (first_kill or rng.random() < 0.5)
        first_kill = first_kill and kind != "kill"
        plan.append(PlannedFault(at, kind, rng.randrange(processes), holding=holding))
    return plan
