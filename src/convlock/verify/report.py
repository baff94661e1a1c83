"""Presenting a verify run: the final table, the JSON report and the PNG timeline.

The table and the JSON say the same things; the JSON adds up to
:data:`DETAILS_PER_PROPERTY` violations per property, each with the events
that show it, so that a failure can be read without rerunning. The timeline
needs matplotlib (the ``plots`` extra) and is skipped with a note without it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .checker import FAULTS, PROPERTIES, Hold, percentile
from .history import CANCEL, FAILOVER, KILL, PAUSE, RESTART, WRITE, Event
from .runner import RunResult

__all__ = ["DETAILS_PER_PROPERTY", "render_table", "report_json", "write_timeline"]

DETAILS_PER_PROPERTY = 20


def _latency(result: RunResult) -> dict[str, Any]:
    handoffs = result.result.handoffs
    if not handoffs:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    return {
        "count": len(handoffs),
        "p50": round(1000 * percentile(handoffs, 0.5), 3),
        "p99": round(1000 * percentile(handoffs, 0.99), 3),
        "max": round(1000 * max(handoffs), 3),
    }


def _writes(events: list[Event]) -> tuple[int, int]:
    accepted = sum(1 for event in events if event.kind == WRITE and event.accepted)
    refused = sum(1 for event in events if event.kind == WRITE and event.accepted is False)
    return accepted, refused


def report_json(run: RunResult) -> dict[str, Any]:
    """The ``--report`` document: ``violations``, ``grants``, ``faults``, per-property details and the run."""
    result = run.result
    accepted, refused = _writes(run.events)
    properties = {}
    for name in PROPERTIES:
        prop = result.properties[name]
        properties[name] = {
            "status": prop.status,
            "checked": prop.checked,
            "violations": len(prop.violations),
            "skipped": prop.skipped,
            "details": [
                {"message": violation.message, "events": [event.short() for event in violation.events]}
                for violation in prop.violations[:DETAILS_PER_PROPERTY]
            ],
        }
    options = run.options
    return {
        "ok": result.ok,
        "violations": result.violation_counts,
        "grants": result.grants,
        "requests": result.requests,
        "faults": {name: result.faults.get(name, 0) for name in FAULTS},
        "kills_while_holding": result.kills_while_holding,
        "handoff_latency_ms": _latency(run),
        "writes": {"accepted": accepted, "refused": refused},
        "properties": properties,
        "run": {
            "store": run.store,
            "target": run.target,
            "seed": run.seed,
            "processes": options.processes,
            "tasks_per_process": options.tasks,
            "conversations": options.conversations,
            "duration": options.duration,
            "lifetime": options.lifetime,
            "wait_timeout": run.wait_timeout,
            "faults_requested": list(options.faults),
            "planned_faults": [
                {
                    "at": round(fault.at, 3),
                    "kind": fault.kind,
                    "worker": fault.worker,
                    "holding": fault.holding,
                }
                for fault in run.plan
            ],
            "elapsed": round(run.elapsed, 3),
            "phases": run.phases,
        },
    }


def render_table(run: RunResult) -> str:
    """The final table printed after a run."""
    result = run.result
    options = run.options
    lines = [
        f"convlock verify: {run.store} store on {run.target}; seed {run.seed}; "
        f"{options.processes} processes x {options.tasks} tasks, {options.conversations} conversations, "
        f"{options.duration:g} s, lifetime {options.lifetime:g} s, wait_timeout {run.wait_timeout:g} s",
        "",
        f"{'property':<20} {'result':<8} {'checked':>9} {'violations':>11}",
    ]
    for name in PROPERTIES:
        prop = result.properties[name]
        status = prop.status.upper() if prop.status == "fail" else prop.status
        lines.append(f"{name:<20} {status:<8} {prop.checked:>9} {len(prop.violations):>11}")
        if prop.skipped:
            lines.append(f"{'':<20} ({prop.skipped})")
    faults = ", ".join(f"{name} {result.faults.get(name, 0)}" for name in FAULTS)
    accepted, refused = _writes(run.events)
    latency = _latency(run)
    lines += [
        "",
        f"faults injected: {faults} (kills while holding: {result.kills_while_holding})",
        f"grants: {result.grants} of {result.requests} requests; register writes accepted {accepted}, "
        f"refused as stale {refused}",
    ]
    if latency["count"]:
        lines.append(
            f"hand-off latency (release to the next waiter's grant): p50 {latency['p50']:.2f} ms, "
            f"p99 {latency['p99']:.2f} ms, max {latency['max']:.2f} ms (n={latency['count']})"
        )
    else:
        lines.append("hand-off latency: no hand-offs to a waiting request were seen")
    if result.faults.get("failover"):
        lines += _failover_story(run)
    shown = 0
    for name in PROPERTIES:
        for violation in result.properties[name].violations[:3]:
            if shown == 0:
                lines += ["", "violations (first 3 per property; --report FILE has more, with their events):"]
            shown += 1
            lines.append(f"  [{name}] {violation.message}")
            for event in violation.events[:4]:
                lines.append(f"      {json.dumps(event.short(30), ensure_ascii=False)}")
    lines += ["", "RESULT: " + ("every property held" if result.ok else "VIOLATIONS FOUND")]
    return "\n".join(lines)


def _failover_story(run: RunResult) -> list[str]:
    """What the failover run shows: the lock may fail, the fenced register must not."""
    counts = run.result.violation_counts
    accepted, _ = _writes(run.events)
    lock = (
        f"mutual exclusion failed {counts['mutual_exclusion']} time(s): Redis replicates asynchronously, "
        "so a new master may not know a grant the old one made"
        if counts["mutual_exclusion"]
        else "mutual exclusion held this time, but a failover can break it (asynchronous replication)"
    )
    register = (
        f"the fenced register lost nothing ({accepted} replica-acknowledged writes)"
        if not counts["no_lost_update"]
        else f"the fenced register LOST UPDATES ({counts['no_lost_update']} violation(s))"
    )
    return [
        "",
        f"failover: {lock}; {register}.",
        "Under failover the lock alone is not enough: fencing is what protects the data.",
    ]


def _timeline_conversation(run: RunResult) -> str | None:
    holds = run.result.holds
    if not holds:
        return None
    for name in ("mutual_exclusion", "fifo", "tokens_increase"):
        for violation in run.result.properties[name].violations:
            if violation.events:
                return violation.events[0].conv
    scores: dict[str, int] = {}
    for hold in holds:
        # Prefer a conversation where a hold lapsed or was cut short by a kill.
        scores[hold.conv] = scores.get(hold.conv, 0) + (1000 if hold.lapsed or hold.released is None else 1)
    return max(scores, key=lambda conv: scores[conv])


def write_timeline(run: RunResult, path: Path) -> str:
    """Draw one conversation's holds and the faults as a PNG; return a line saying what was done."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "timeline: skipped, matplotlib is missing (pip install 'convlock[plots]')"
    conv = _timeline_conversation(run)
    if conv is None:
        return "timeline: skipped, nothing was granted"
    holds: list[Hold] = [hold for hold in run.result.holds if hold.conv == conv]
    start = min(event.t for event in run.events)
    workers = sorted(
        {hold.worker for hold in holds} | {e.worker for e in run.events if e.kind in (KILL, PAUSE)}
    )
    row = {worker: index for index, worker in enumerate(workers)}
    last_event: dict[str, float] = {}
    for event in run.events:
        if event.req:
            last_event[event.req] = max(last_event.get(event.req, -math.inf), event.t)
    fig, ax = plt.subplots(figsize=(12, max(3.0, 0.35 * len(workers) + 1.5)))
    for hold in holds:
        y = row[hold.worker]
        end = hold.released if hold.released is not None else last_event.get(hold.req, hold.granted)
        valid_end = max(hold.granted, min(hold.ok_until, end if end > hold.granted else hold.ok_until))
        ax.barh(
            y, max(valid_end - hold.granted, 0.002), left=hold.granted - start, height=0.6, color="tab:blue"
        )
        if end > valid_end:
            ax.barh(y, end - valid_end, left=valid_end - start, height=0.6, color="tab:orange")
    for event in run.events:
        if event.kind in (RESTART, FAILOVER):
            color = "0.85" if event.kind == RESTART else "mistyrose"
            ax.axvspan(event.t - start, (event.end or event.t) - start, color=color, zorder=0)
        elif event.kind == PAUSE and event.worker in row:
            ax.barh(
                row[event.worker],
                (event.end or event.t) - event.t,
                left=event.t - start,
                height=0.9,
                color="0.6",
                alpha=0.35,
                zorder=0,
            )
        elif event.kind == KILL and event.worker in row and event.detail != "shutdown":
            ax.plot(event.t - start, row[event.worker], marker="x", color="red", markersize=10, mew=2)
        elif event.kind == CANCEL and event.worker in row:
            ax.plot(event.t - start, row[event.worker], marker="v", color="purple", markersize=6)
    for violation in run.result.properties["mutual_exclusion"].violations:
        if violation.events and violation.events[-1].conv == conv:
            ax.axvline(violation.events[-1].t - start, color="red", linewidth=0.8)
    ax.set_yticks(range(len(workers)), workers)
    ax.set_xlabel("seconds since the run began")
    label = conv if len(conv) <= 40 else conv[:40] + "..."
    ax.set_title(
        f"conversation {label!r}\nholds (blue: un-lapsed, orange: after the lease was lost), pauses (grey), "
        "restarts (light grey), failovers (pink), kills (x), cancels (v), overlaps (red lines)",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"timeline of conversation {label!r} written to {path}"
