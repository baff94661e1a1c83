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
for the oldest call still running. When a call's deadline passes while it
is inside, the timer cancels its task, and leaving the block turns that
cancellation into ``TimeoutError``, exactly as ``asyncio.timeout(s)`` does
(``expired()`` included).

Why not an ``asyncio.Timeout`` per call, entered without a deadline and
rescheduled by the shared timer, as this module first did: entering and
leaving one is two coroutines, a ``current_task()`` and a
``reschedule(None)``, about 5 us of the server's 110 us per message in
memory (``/proc`` schedstat, the bench's 16 conversations, interleaved
with and without a bound). :class:`Bounded` is a plain ``with`` block that
keeps the same state ``asyncio.Timeout`` keeps (the task, its
``cancelling()`` count on entry, whether the deadline cancelled it) and
applies the same rule at exit; ``tests/server/test_deadlines.py`` checks it
against that rule. Open question: Python 3.12's ``Timeout`` also handles a
task cancelled by two timeouts at once; one bound per call never is.

A call that leaves early only marks its entry; entries are dropped as they
reach the head of the FIFO (each time a call starts, and when the timer
fires), so the FIFO holds about the calls in flight plus those that ended
behind a slower one, and never a task once its call has left.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType
from typing import Any

__all__ = ["UNBOUNDED", "Bounded", "SharedDeadlines"]


# A bound's states, as asyncio.Timeout's: not entered yet, inside its block,
# cancelled by its deadline while inside, left in time, left after expiring.
_NEW, _INSIDE, _EXPIRING, _LEFT, _EXPIRED = range(5)


class SharedDeadlines:
    """Timeouts of ``seconds`` for any number of concurrent calls on one event loop, sharing one timer."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._entries: deque[Bounded] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def timeout(self) -> Bounded:
        """A context manager (``with``) bounding its block to ``seconds`` (``TimeoutError`` past them).

        Enter it inside a task; it cancels that task when the time is up.
        """
        return Bounded(self)

    def _add(self, bound: Bounded, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:
            # A new loop (tests run several): what the last one held can never fire there.
            self._loop, self._entries, self._timer = loop, deque(), None
        entries = self._entries
        while entries and entries[0]._state != _INSIDE:
            entries.popleft()
        bound.deadline = loop.time() + self.seconds
        entries.append(bound)
        if self._timer is None:
            self._timer = loop.call_at(entries[0].deadline, self._fire)

    def _fire(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        entries = self._entries
        while entries:
            head = entries[0]
            if head._state == _INSIDE:
                if head.deadline > now:
                    self._timer = loop.call_at(head.deadline, self._fire)
                    return
                head._expire()
            entries.popleft()


class Bounded:
    """One call's bound (see :class:`SharedDeadlines`); ``expired()`` as ``asyncio.Timeout``'s.

    Past its deadline it cancels the task that entered it; leaving the block
    then raises ``TimeoutError`` in place of that ``CancelledError``, unless
    someone else cancelled the task too (their cancellation stays one).
    """

    __slots__ = ("_cancelling", "_owner", "_state", "_task", "deadline")

    def __init__(self, owner: SharedDeadlines) -> None:
        self._owner = owner
        self._task: asyncio.Task[Any] | None = None
        self._state = _NEW
        self._cancelling = 0
        self.deadline = 0.0

    def __enter__(self) -> Bounded:
        if self._state != _NEW:
            raise RuntimeError("a handler deadline can be entered once")
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a handler deadline must be entered inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._state = _INSIDE
        self._owner._add(self, task.get_loop())
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        task, self._task = self._task, None
        if self._state != _EXPIRING:
            self._state = _LEFT
            return
        self._state = _EXPIRED
        assert task is not None
        if task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
            raise TimeoutError from exc

    def _expire(self) -> None:
        assert self._task is not None
        self._state = _EXPIRING
        self._task.cancel()

    def expired(self) -> bool:
        """Whether the deadline passed and cancelled the block (as ``asyncio.Timeout.expired``)."""
        return self._state in (_EXPIRING, _EXPIRED)


class _Unbounded:
    """A block without a deadline: what :data:`UNBOUNDED` is."""

    __slots__ = ()

    def __enter__(self) -> _Unbounded:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def expired(self) -> bool:
        """Never: nothing bounds the block."""
        return False


#: Used as ``with UNBOUNDED:`` where no deadline applies; shared, as it holds nothing.
UNBOUNDED = _Unbounded()
