"""SharedDeadlines: asyncio.timeout's behaviour for every handler call, with one timer between them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
import uvloop

from convlock.server.deadlines import SharedDeadlines


async def _call(deadlines: SharedDeadlines, seconds: float) -> tuple[str, bool]:
    bound = deadlines.timeout()
    try:
        with bound:
            await asyncio.sleep(seconds)
    except TimeoutError:
        return "timeout", bound.expired()
    return "done", bound.expired()


@pytest.mark.parametrize("loop_runner", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_each_call_times_out_at_its_own_deadline(loop_runner: object) -> None:
    async def main() -> None:
        deadlines = SharedDeadlines(0.2)
        started = time.monotonic()
        # Out of order: short and long calls interleaved, a late starter whose deadline is later.
        first = asyncio.gather(_call(deadlines, 0.05), _call(deadlines, 0.6), _call(deadlines, 0.1))
        await asyncio.sleep(0.1)
        late = asyncio.ensure_future(_call(deadlines, 0.15))  # deadline 0.3, done at 0.25
        late_slow = asyncio.ensure_future(_call(deadlines, 1.0))  # deadline 0.3
        assert list(await first) == [("done", False), ("timeout", True), ("done", False)]
        assert 0.18 <= time.monotonic() - started < 0.28
        assert await late == ("done", False)
        assert await late_slow == ("timeout", True)
        assert 0.28 <= time.monotonic() - started < 0.4

    loop_runner(main())  # type: ignore[operator]


def test_finished_calls_are_not_kept_and_the_timer_is_shared() -> None:
    async def main() -> None:
        deadlines = SharedDeadlines(30.0)
        for _ in range(1000):
            assert await _call(deadlines, 0) == ("done", False)
        # Each start drops the finished calls at the head: one entry left, one timer armed.
        assert len(deadlines._entries) == 1
        assert deadlines._timer is not None
        deadlines._timer.cancel()

    asyncio.run(main())


def test_a_new_event_loop_starts_afresh() -> None:
    deadlines = SharedDeadlines(0.05)

    async def abandoned() -> None:
        # Leaves a call inside and a timer armed on a loop that then closes.
        task = asyncio.ensure_future(_call(deadlines, 10))
        await asyncio.sleep(0)
        task.cancel()

    asyncio.run(abandoned())
    assert asyncio.run(_call(deadlines, 1)) == ("timeout", True)


def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    async def main() -> None:
        deadlines = SharedDeadlines(5.0)
        task = asyncio.ensure_future(_call(deadlines, 10))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


async def _enter(stack: contextlib.AsyncExitStack, bound: Any) -> None:
    """Enter ``bound`` on ``stack``: an ``asyncio.Timeout`` is entered with ``async with``, ours with ``with``."""
    if hasattr(bound, "__aenter__"):
        await stack.enter_async_context(bound)
    else:
        stack.enter_context(bound)


async def _swallow(bound: Any) -> str:
    """The block catches the cancellation itself and finishes normally."""
    async with contextlib.AsyncExitStack() as stack:
        await _enter(stack, bound)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "swallowed"
    return "done"


async def _cancelled_twice(bound: Any) -> str:
    """The deadline and someone else both cancel the task: it must stay cancelled."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().call_later(0.04, task.cancel)
    try:
        async with contextlib.AsyncExitStack() as stack:
            await _enter(stack, bound)
            time.sleep(0.06)  # noqa: ASYNC251  (blocks on purpose: both callbacks fall due together)
            await asyncio.sleep(10)
    except TimeoutError:
        return "timeout"
    except asyncio.CancelledError:
        return "cancelled"
    return "done"


@pytest.mark.parametrize("scenario", [_swallow, _cancelled_twice], ids=["swallowed", "cancelled-twice"])
def test_the_exit_rule_is_asyncio_timeouts(scenario: Any) -> None:
    async def outcome(make_bound: Any) -> tuple[str, bool]:
        bound = make_bound()
        try:
            result = await asyncio.ensure_future(scenario(bound))
        except asyncio.CancelledError:
            result = "cancelled outside"
        return result, bound.expired()

    async def main() -> None:
        ours = await outcome(lambda: SharedDeadlines(0.05).timeout())
        theirs = await outcome(lambda: asyncio.timeout(0.05))
        assert ours == theirs
        assert ours[1] is True

    asyncio.run(main())


def test_a_bound_is_entered_once() -> None:
    async def main() -> None:
        bound = SharedDeadlines(1.0).timeout()
        with bound:
            pass
        with pytest.raises(RuntimeError, match="once"), bound:
            pass

    asyncio.run(main())
