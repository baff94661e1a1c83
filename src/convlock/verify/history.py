"""The history of a verify run: one :class:`Event` per thing that happened, as JSON lines.

Every worker process appends its own events to its own file, one JSON object
per line, flushed per line, so a worker killed with SIGKILL loses nothing it
had written (the kernel keeps flushed data). The controller keeps the fault
events. Times are ``time.monotonic()``: on Linux that is CLOCK_MONOTONIC, one
clock shared by every process of the machine, so the events of different
processes can be ordered by time.

Where an event's time sits matters to the checker, and the workers keep one
rule: a time that opens an interval is taken *after* the call it reports
returned (a grant's time is when the grant was known) and a time that closes
one is taken *before* the call (a release's time is before the release was
sent). A measured hold is therefore inside the real one, so two measured
holds that overlap prove that two real holds overlapped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Any

__all__ = [
    "CANCEL",
    "ERROR",
    "EXIT",
    "FAILOVER",
    "GRANT",
    "HOLD_STOP",
    "KILL",
    "LOST",
    "PAUSE",
    "READ",
    "REGISTER",
    "RELEASE",
    "REQUEST",
    "RESTART",
    "START",
    "WRITE",
    "WRITE_START",
    "Event",
    "EventWriter",
    "read_events",
]

# Worker events, in the order one request makes them.
REQUEST = "request"  # t: just before lock() was entered
GRANT = "grant"  # t: just after the lock was granted; ticket; lost: held.lost then
READ = "read"  # t: after the fenced read returned; value, seen; lost: held.lost then
WRITE_START = "write-start"  # t: before the fenced write was sent; lost: held.lost then
WRITE = "write"  # t: after it returned; accepted; seen: the register's highest ticket
RELEASE = "release"  # t: before the lock was released; lost: held.lost then
LOST = "lost"  # the holder learnt that its lease had lapsed (held.lost or LockLostError)
ERROR = "error"  # the request failed; error: the exception's class, or "cancelled"
# Worker life.
START = "start"  # pid
HOLD_STOP = "hold-stop"  # the worker stops itself (SIGSTOP) while holding, on the controller's request
EXIT = "exit"  # clean exit; detail: conversations the store still reported (in-memory)
REGISTER = "register"  # a local register's final value (in-memory runs without Redis)
# Controller events: the faults.
KILL = "kill"  # SIGKILL of a worker; detail "holding" when it was stopped while holding
PAUSE = "pause"  # SIGSTOP at t, SIGCONT at end
CANCEL = "cancel"  # SIGUSR1: the worker cancels its waiting tasks
RESTART = "restart"  # the spawned Redis went down at t and answered again at end
FAILOVER = "failover"  # a forced Sentinel failover began at t; a new master had a synced replica at end


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened, at monotonic time ``t``; unused fields stay at their defaults."""

    t: float
    kind: str
    worker: str = ""
    req: str = ""
    conv: str = ""
    ticket: int | None = None
    lost: bool | None = None
    accepted: bool | None = None
    value: int | None = None
    seen: int | None = None
    error: str = ""
    detail: str = ""
    end: float | None = None
    pid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from their defaults (the short JSON form)."""
        defaults = _DEFAULTS
        return {key: value for key, value in asdict(self).items() if value != defaults.get(key, ...)}

    def to_json(self) -> str:
        """One line of JSON, non-ASCII kept as is."""
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        return cls(**{key: value for key, value in data.items() if key in _NAMES})

    def short(self, limit: int = 60) -> dict[str, Any]:
        """:meth:`to_dict` with long conversation IDs cut, for reports."""
        data = self.to_dict()
        conv = data.get("conv")
        if isinstance(conv, str) and len(conv) > limit:
            data["conv"] = f"{conv[:limit]}... ({len(conv.encode())} bytes)"
        return data


_NAMES = frozenset(f.name for f in fields(Event))
_DEFAULTS = {f.name: f.default for f in fields(Event)}


class EventWriter:
    """Appends events to a file, one line each, flushed at once (so SIGKILL loses none)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def write(self, event: Event) -> None:
        """Append ``event`` and hand it to the kernel before returning."""
        self._file.write(event.to_json() + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def read_events(path: Path) -> Iterator[Event]:
    """The events of one file, skipping a last line cut short by a kill."""
    with path.open(encoding="utf-8") as file:
        for line in file:
            if not line.endswith("\n"):
                return  # the process died mid-write
            try:
                yield Event.from_dict(json.loads(line))
            except (ValueError, TypeError):
                continue


def sort_events(events: Iterable[Event]) -> list[Event]:
    """Events in time order (stable, so one worker's events keep their order)."""
    return sorted(events, key=lambda event: event.t)
