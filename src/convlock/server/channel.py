"""The REST channel: ``POST /webhooks/rest/webhook``.

Each message is processed inside ``lock_store.lock(sender)``: load the
conversation (raising the tracker's fence to this ticket), call the handler
under ``handler_timeout``, save events and state fenced by the same ticket,
release. Whatever goes wrong, the lock is released by leaving the ``async
with`` block and nothing is saved unless the handler finished in time.

Back-pressure: at most ``--max-waiting-per-conversation`` messages of one
conversation wait for its lock in one process. Past that, a message gets 429
with ``Retry-After`` and nothing is stored (outcome ``overloaded``): a
flooding client (a retrying webhook, a bot loop) cannot queue without bound,
and other conversations, whose locks and connections are separate, do not
notice it.

Outcomes: 200 with the responses; 409 when the tracker refused this ticket
as stale (the lease lapsed or was revoked and a newer holder took over);
504 when the handler ran out of time; 500 when it raised or returned
something that is not JSON; 503 when a store is unreachable, the lock was
not granted within the lock store's ``wait_timeout``, or the server's
shutdown cancelled the message past ``--shutdown-timeout``.

The ``Server-Timing`` header of a 200 splits the request time into
``lock`` (waiting for and acquiring the lock), ``load``, ``handler``,
``save``, ``release`` and ``total`` (milliseconds), so a client can see
what the lock costs.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..errors import LockLostError, LockStoreUnavailable, LockTimeoutError
from ..redact import exception_summary
from .context import ServerContext
from .conversation import Conversation, Message
from .handlers import normalize_responses
from .responses import ApiError, JSONResponse
from .tracker import StaleTicketError, TrackerStoreUnavailable, dumps
from .validation import parse_json, read_body, validate_webhook

__all__ = ["process_message", "webhook"]

logger = logging.getLogger("convlock.server")


class _Timing:
    """Named durations of one request, rendered as a ``Server-Timing`` header."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}

    def header(self) -> str:
        return ", ".join(f"{name};dur={seconds * 1000:.3f}" for name, seconds in self.parts.items())


async def webhook(request: Request) -> Response:
    """Validate the body, process the message, answer with the handler's responses."""
    ctx: ServerContext = request.app.state.ctx
    body = await read_body(request)
    payload = validate_webhook(parse_json(body))
    message = Message(payload.sender, payload.message, payload.metadata or {})
    timing = _Timing()
    responses = await process_message(ctx, message, timing)
    return JSONResponse(responses, headers={"Server-Timing": timing.header()})


async def process_message(
    ctx: ServerContext, message: Message, timing: _Timing | None = None
) -> list[dict[str, Any]]:
    """Run one message through lock, load, handler, save and release.

    Returns the response dicts, or raises :class:`ApiError` with the status
    the client should get. ``timing`` (optional) receives the phase durations.
    """
    parts: dict[str, float] = timing.parts if timing is not None else {}
    metrics = ctx.metrics
    cid = message.sender
    waiting = ctx.waiting.get(cid, 0)
    if waiting >= ctx.max_waiting:
        metrics.messages.labels("overloaded").inc()
        raise ApiError(
            429,
            "too_many_waiting",
            f"{waiting} messages of this conversation already wait for its lock on this server (the "
            "limit is --max-waiting-per-conversation); nothing was stored: retry later",
            headers={"Retry-After": "1"},
        )
    ctx.waiting[cid] = waiting + 1
    queued = True
    metrics.in_flight.inc()
    ctx.in_flight += 1
    ctx.idle.clear()
    outcome = "ok"
    start = time.perf_counter()
    acquired = released = 0.0
    try:
        async with ctx.lock_store.lock(cid) as held:
            queued = _unqueue(ctx, cid)
            acquired = time.perf_counter()
            parts["lock"] = acquired - start
            try:
                responses = await _locked(ctx, message, held.ticket, parts)
            finally:
                leaving = time.perf_counter()
        released = time.perf_counter()
        parts["release"] = released - leaving
        parts["total"] = released - start
        return responses
    except ApiError as exc:
        outcome = {409: "stale", 504: "handler_timeout", 500: "handler_error"}.get(
            exc.status_code, "unavailable"
        )
        raise
    except LockLostError as exc:
        # An operator revoked this message's ticket while it waited.
        outcome = "revoked"
        raise ApiError(409, "ticket_revoked", str(exc)) from None
    except LockTimeoutError as exc:
        outcome = "lock_timeout"
        raise ApiError(503, "lock_timeout", str(exc), headers={"Retry-After": "1"}) from None
    except (LockStoreUnavailable, TrackerStoreUnavailable) as exc:
        outcome = "unavailable"
        raise ApiError(503, "store_unavailable", str(exc), headers={"Retry-After": "1"}) from None
    except asyncio.CancelledError:
        # Only the server's shutdown cancels a request (past --shutdown-timeout).
        # The lock was released on the way out; answer in JSON rather than
        # let the server send a plain-text 500.
        task = asyncio.current_task()
        if task is None or not task.cancelling():
            raise
        task.uncancel()
        outcome = "cancelled"
        raise ApiError(
            503,
            "shutting_down",
            "the server shut down before this message finished and cancelled it; its lock was "
            "released and, unless it was cancelled while saving, nothing was stored",
            headers={"Retry-After": "1"},
        ) from None
    finally:
        if queued:
            _unqueue(ctx, cid)
        metrics.messages.labels(outcome).inc()
        metrics.in_flight.dec()
        ctx.in_flight -= 1
        if not ctx.in_flight:
            ctx.idle.set()


def _unqueue(ctx: ServerContext, cid: str) -> bool:
    """Count one message of ``cid`` as no longer waiting; returns False (it is not queued now)."""
    left = ctx.waiting[cid] - 1
    if left:
        ctx.waiting[cid] = left
    else:
        del ctx.waiting[cid]
    return False


async def _locked(
    ctx: ServerContext, message: Message, ticket: int, parts: dict[str, float]
) -> list[dict[str, Any]]:
    """The part of a message's processing that runs while holding the lock."""
    metrics = ctx.metrics
    cid = message.sender
    t0 = time.perf_counter()
    try:
        record = await ctx.tracker_store.load(cid, ticket=ticket)
    except StaleTicketError as exc:
        raise ApiError(409, "stale_ticket", str(exc)) from None
    t1 = time.perf_counter()
    parts["load"] = t1 - t0
    metrics.tracker_seconds.labels("load").observe(t1 - t0)

    turn = 1 + sum(1 for event in record.events if event.get("event") == "user")
    conversation = Conversation(cid, tuple(record.events), record.state, turn, ticket)
    timeout = asyncio.timeout(ctx.handler_timeout)
    try:
        async with timeout:
            result = await ctx.handler(message, conversation)
        responses = normalize_responses(result, cid)
        # Prove the results are JSON before anything is saved.
        dumps(responses)
        dumps(conversation.state)
    except TimeoutError as exc:
        if not timeout.expired():
            raise _handler_error(cid, exc) from None
        raise ApiError(
            504,
            "handler_timeout",
            f"the handler did not answer within {ctx.handler_timeout:g}s; the conversation's state is "
            "unchanged and its lock was released",
        ) from None
    except asyncio.CancelledError as exc:
        # A handler may raise CancelledError itself (e.g. from a library's own
        # cancelled task) while nobody cancels this request: that is its failure.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        raise _handler_error(cid, exc) from None
    except Exception as exc:
        raise _handler_error(cid, exc) from None
    finally:
        t2 = time.perf_counter()
        parts["handler"] = t2 - t1
        metrics.handler_seconds.observe(t2 - t1)

    now = time.time()
    user_event: dict[str, Any] = {
        "event": "user",
        "text": message.text,
        "turn": turn,
        "ticket": ticket,
        "timestamp": now,
    }
    if message.metadata:
        user_event["metadata"] = dict(message.metadata)
    bot_events = [
        {
            "event": "bot",
            "turn": turn,
            "timestamp": now,
            **{k: v for k, v in response.items() if k != "recipient_id"},
        }
        for response in responses
    ]
    try:
        await ctx.tracker_store.save(
            cid, ticket=ticket, new_events=[user_event, *bot_events], state=conversation.state
        )
    except StaleTicketError as exc:
        raise ApiError(409, "stale_ticket", str(exc)) from None
    t3 = time.perf_counter()
    parts["save"] = t3 - t2
    metrics.tracker_seconds.labels("save").observe(t3 - t2)
    return responses


def _handler_error(conversation_id: str, exc: BaseException) -> ApiError:
    # Logged here, where it is still being handled. The exception's message
    # may quote the user's text or the handler's results, so it goes to the
    # debug log only; the error log and the reply name its type and an ID.
    incident = uuid.uuid4().hex[:12]
    logger.error(
        "handler failed for conversation %r (incident %s); state left unchanged: %s",
        conversation_id,
        incident,
        exception_summary(exc),
    )
    logger.debug("handler failure %s in full", incident, exc_info=exc)
    return ApiError(
        500,
        "handler_error",
        f"the handler failed ({type(exc).__name__}, incident {incident} in the server log); the "
        "conversation's state is unchanged and its lock was released",
    )
