"""Handler timeouts that share one timer: ``asyncio.timeout`` per message, without a timer per message.

Every handler call runs under ``--handler-timeout``. ``asyncio.timeout(s)``
schedules a timer when it is entered and cancels it at exit; under uvloop
that is a libuv timer made, started, stopped and closed for every message.
Measured with the bench's 16 conversations in memory: ``convlock run``'s
server CPU per message went from 367 to 324 us with this module (medians
of three runs interleaved with the previous code), the largest single cost
left on the hot path once :mod:`.webhook_asgi` had removed Starlette's layers.

Every call has the same duration, so deadlines fall in the order the calls
start: :class:`SharedDeadlines` keeps them in a FIFO and arms one timer,
for the oldest call still running. Each call still runs in a real
:class:`asyncio.Timeout`, entered without a deadline; when a call's
deadline passes while it is inside, the shared timer reschedules its
``Timeout`` to now, and asyncio cancels the task and turns the
cancellation into ``TimeoutError`` at exit, exactly as
``asyncio.timeout(s)`` does (``expired()`` included).

A call that leaves early only marks its entry; entries are dropped as they
reach the head of the FIFO (each time a call starts, and when the timer
fires), so the FIFO holds about the calls in flight plus those that ended
behind a slower one, never a task or its result.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType

__all__ = ["SharedDeadlines"]


class _Entry:
    __slots__ = ("deadline", "timeout")

    def __init__(self, deadline: float, timeout: asyncio.Timeout) -> None:
        self.deadline = deadline
        self.timeout: asyncio.Timeout | None = timeout  # None once the call has left


class SharedDeadlines:
    """Timeouts of ``seconds`` for any number of concurrent calls on one event loop, sharing one timer."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._entries: deque[_Entry] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def timeout(self) -> Bounded:
        """An async context manager bounding its block to ``seconds`` (``TimeoutError`` past them)."""
        return Bounded(self)

    def _add(self, timeout: asyncio.Timeout) -> _Entry:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A new loop (tests run several): what the last one held can never fire there.
            self._loop, self._entries, self._timer = loop, deque(), None
        entries = self._entries
        while entries and entries[0].timeout is None:
            entries.popleft()
        entry = _Entry(loop.time() + self.seconds, timeout)
        entries.append(entry)
        if self._timer is None:
            self._timer = loop.call_at(entries[0].deadline, self._fire)
        return entry

    def _fire(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        entries = self._entries
        while entries:
            head = entries[0]
            if head.timeout is not None:
                if head.deadline > now:
                    self._timer = loop.call_at(head.deadline, self._fire)
                    return
                head.timeout.reschedule(now)  # asyncio cancels the task, as at its own deadline
            entries.popleft()


class Bounded:
    """One call's bound (see :class:`SharedDeadlines`); ``expired()`` as ``asyncio.Timeout``'s."""

    __slots__ = ("_entry", "_owner", "_timeout")

    def __init__(self, owner: SharedDeadlines) -> None:
        self._owner = owner
        self._timeout = asyncio.Timeout(None)
        self._entry: _Entry | None = None

    async def __aenter__(self) -> Bounded:
        await self._timeout.__aenter__()
        self._entry = self._owner._add(self._timeout)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        if self._entry is not None:
            self._entry.timeout = None
        await self._timeout.__aexit__(kind, exc, tb)  # raises TimeoutError for an expired block
        return None

    def expired(self) -> bool:
        """Whether the deadline passed and cancelled the block (as ``asyncio.Timeout.expired``)."""
        return self._timeout.expired()
