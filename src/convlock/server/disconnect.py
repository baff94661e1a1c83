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
"""

from __future__ import annotations

import inspect
from typing import Any

import anyio
from starlette.types import Receive

__all__ = ["client_disconnected"]


async def client_disconnected(receive: Receive) -> bool:
    """Whether the client behind ASGI ``receive`` has gone, asked without waiting (read the body first).

    As with ``Request.is_disconnected``, a message other than
    ``http.disconnect`` that happens to be ready is consumed and dropped.
    Unlike it, nothing is remembered: call it once.
    """
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


def _is_disconnect(message: Any) -> bool:
    return isinstance(message, dict) and message.get("type") == "http.disconnect"
