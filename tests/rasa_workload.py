"""Drive the Rasa workload: several replica processes on one conversation.

``run_replicas`` writes nothing itself: it takes an endpoints.yml path (any
``lock_store:`` type Rasa's factory builds), starts the processes, lets them
go at once, and summarises what they did as an :class:`Outcome`: how many
updates were lost, how many messages Rasa would have dropped (``LockError``),
how many never finished, whether holds overlapped or were served out of
ticket order.

Each replica is a ``convlock bench`` worker process (``python -m
convlock.bench.worker``) running its ``rasa`` command, the workload scenario 8
measures: the store is built the way a Rasa user configures it
(``read_endpoint_config(endpoints, "lock_store")``, then
``LockStore.create(...)``), and each message does what Rasa's processor does::

    async with store.lock(sender_id, wait_time_in_seconds=0.01):
        ... a non-atomic read-modify-write of a counter in Redis ...

Used by tests/test_rasa_integration.py.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis


@dataclass(frozen=True)
class Outcome:
    """What the replicas did together.

    ``lost_updates`` is completed messages minus the counter's final value:
    each completed message incremented it once, so any shortfall is an
    increment overwritten by an overlapping holder. ``overlaps`` counts pairs
    of holds (in start order) where the later began before the earlier ended;
    ``out_of_order`` counts pairs served against ticket order (convlock's
    stores only: Rasa's report no ticket numbers).
    """

    messages: int
    completed: int
    counter: int
    lost_updates: int
    lock_errors: int
    unfinished: int
    overlaps: int
    out_of_order: int
    processes_served: int
    handoffs: int
    elapsed: float
    errors: tuple[str, ...]

    def summary(self) -> str:
        """One line for people: the figures the comparison prints."""
        return (
            f"{self.completed}/{self.messages} messages done in {self.elapsed:.1f}s, "
            f"{self.lost_updates} lost updates, {self.lock_errors} LockError, "
            f"{self.unfinished} unfinished, {self.overlaps} overlapping holds"
        )


def _spawn() -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "convlock.bench.worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_replicas(
    endpoints: Path,
    *,
    counter_url: str,
    counter_key: str,
    conversation: str = "rasa-user",
    processes: int = 2,
    messages: int = 200,
    tasks: int = 1,
    hold: float = 0.0005,
    deadline: float = 60.0,
) -> Outcome:
    """Run ``processes`` replicas of ``messages`` each on ``conversation``; summarise them.

    The counter lives at ``counter_key`` in the Redis at ``counter_url`` (it
    need not be the lock store's). Each process gives up ``deadline`` seconds
    after the start (and waits as long at most for the others to connect);
    a process that does not report within ``2 * deadline + 30`` seconds is
    killed and the run fails with its stderr.
    """
    ready_key = f"{counter_key}:ready"  # the workers' start barrier
    with redis.Redis.from_url(counter_url) as client:
        client.delete(counter_key, ready_key)
    command: dict[str, Any] = {
        "op": "rasa",
        "endpoints": str(endpoints),
        "url": counter_url,
        "counter_key": counter_key,
        "conversation": conversation,
        "messages": messages,
        "tasks": tasks,
        "hold": hold,
        "deadline": deadline,
        "parties": processes,
    }
    workers = [_spawn() for _ in range(processes)]
    try:
        for worker in workers:
            assert worker.stdout is not None
            line = worker.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"replica did not start: {line!r}\n{worker.communicate()[1]}")
        # They start together once all have connected (the barrier), so that they contend.
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(json.dumps(command) + "\n")
            worker.stdin.flush()
        # communicate() closes stdin: each worker answers, then exits.
        outputs = [worker.communicate(timeout=2 * deadline + 30) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    reports = []
    for worker, (out, err) in zip(workers, outputs, strict=True):
        answer = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        if worker.returncode != 0 or "result" not in answer:
            raise RuntimeError(f"replica exited with {worker.returncode}: {answer.get('error', '')}\n{err}")
        reports.append(answer["result"])
    with redis.Redis.from_url(counter_url) as client:
        counter = int(client.get(counter_key) or 0)
        client.delete(counter_key, ready_key)
    holds = sorted((hold for report in reports for hold in report["holds"]), key=lambda hold: hold[1])
    overlaps = sum(later[1] < earlier[2] for earlier, later in itertools.pairwise(holds))
    out_of_order = sum(
        earlier[0] is not None and later[0] is not None and later[0] <= earlier[0]
        for earlier, later in itertools.pairwise(holds)
    )
    return Outcome(
        messages=processes * messages,
        completed=len(holds),
        counter=counter,
        lost_updates=len(holds) - counter,
        lock_errors=sum(report["lock_errors"] for report in reports),
        unfinished=sum(report["unfinished"] for report in reports),
        overlaps=overlaps,
        out_of_order=out_of_order,
        processes_served=len({hold[3] for hold in holds}),
        handoffs=sum(a[3] != b[3] for a, b in itertools.pairwise(holds)),
        elapsed=max(report["elapsed"] for report in reports),
        errors=tuple(report["error"] for report in reports if report["error"]),
    )
