"""Whether an HTTP client has gone, asked without waiting: once per message, on the hot path.

ASGI has no "has the client gone?" call: a server reports a disconnect as
the next message of ``receive()``, which otherwise waits until something
arrives. Starlette's ``Request.is_disconnected`` polls it by calling
``receive()`` inside an anyio ``CancelScope`` cancelled in advance. That
formats the task's repr (anyio's cancel reason), cancels the task,
delivers the cancellation through two more passes of the event loop and
unwinds a ``CancelledError``: profiled in ``convlock run`` (py-spy, the
bench's 16 conversations, in memory), about 200 us of server CPU per
message, a quarter of all the server did, and the largest single cost
above the bare echo.

:func:`client_disconnected` asks the same question by running one step of
``receive()``'s coroutine in the calling task: if it finishes at once, the
message it returns is the answer; if it would wait, nothing has arrived
and the coroutine is closed, which unwinds its wait (``asyncio.Event`` and
``asyncio.Queue`` remove their waiter in ``finally``/``except``). Nothing
is scheduled and nothing is cancelled. A ``receive`` whose awaitable is
not a coroutine (it cannot be stepped) is awaited Starlette's way.

Under uvicorn (what ``convlock run`` serves on) there is a cheaper answer
still: ``receive`` is a bound method of uvicorn's request cycle, whose
``disconnected`` and ``response_complete`` flags are exactly what its
``receive()`` reads to answer ``http.disconnect`` (h11 and httptools
alike), so :func:`client_disconnected` reads them instead of stepping
``receive()``. Stepping it costs more than it looks: uvicorn's
``receive()`` resumes the transport's reading and parks on an
``asyncio.Event`` (a future, and the running-loop lookup that makes a
``getpid`` system call on Python 3.11), and closing it unwinds all that.
Measured with the bench's 16 conversations in memory (server CPU per
message, interleaved A/B of two replicas): 110 -> 98 and 111 -> 102 us,
and messages/s up 9-13%. Only a cycle whose two flags are both ``bool``
is read this way (:func:`reads_server_flags`); any other ``receive``,
such as the access middleware's replay of a body it has read, or another
ASGI server's, is stepped as above.
"""

from __future__ import annotations

import inspect
from typing import Any

import anyio
from starlette.types import Receive

__all__ = ["client_disconnected", "reads_server_flags"]


async def client_disconnected(receive: Receive) -> bool:
    """Whether the client behind ASGI ``receive`` has gone, asked without waiting (read the body first).

    As with ``Request.is_disconnected``, a message other than
    ``http.disconnect`` that happens to be ready is consumed and dropped.
    Unlike it, nothing is remembered: call it once.
    """
    cycle = _server_cycle(receive)
    if cycle is not None:
        return bool(cycle.disconnected or cycle.response_complete)
    pending = receive()
    if inspect.iscoroutine(pending):
        try:
            pending.send(None)
        except StopIteration as finished:
            return _is_disconnect(finished.value)
        pending.close()  # it would wait: nothing has arrived
        return False
    message: Any = {}
    with anyio.CancelScope() as scope:
        scope.cancel()
        message = await pending
    return _is_disconnect(message)


def reads_server_flags(receive: Receive) -> bool:
    """Whether :func:`client_disconnected` answers for ``receive`` from its server's flags (uvicorn's)."""
    return _server_cycle(receive) is not None


def _server_cycle(receive: Receive) -> Any:
    """uvicorn's request cycle behind ``receive`` (a bound method of it), or None for any other."""
    cycle = getattr(receive, "__self__", None)
    flags = (getattr(cycle, "disconnected", None), getattr(cycle, "response_complete", None))
    return cycle if type(flags[0]) is bool and type(flags[1]) is bool else None


def _is_disconnect(message: Any) -> bool:
    return isinstance(message, dict) and message.get("type") == "http.disconnect"
