"""The REST channel: ``POST /webhooks/rest/webhook``.

Each message is processed in a turn of the conversation's lock
(:mod:`.message_path`): load the conversation (raising the tracker's fence
to this ticket), call the handler under ``handler_timeout``, save events and
state fenced by the same ticket, release. Whatever goes wrong, the lock is
released by leaving the ``async with`` block and nothing is saved unless the
handler finished in time. With the lock and the tracker on one Redis, the
turn takes two round trips (:mod:`.redis_message_path`); the save then
releases the lock in the same script.

Back-pressure: at most ``--max-waiting-per-conversation`` messages of one
conversation wait for its lock in one process. Past that, a message gets 429
with ``Retry-After`` and nothing is stored (outcome ``overloaded``): a
flooding client (a retrying webhook, a bot loop) cannot queue without bound,
and other conversations, whose locks and connections are separate, do not
notice it.

Outcomes: 200 with the responses; 409 when the tracker refused this ticket
as stale (the lease lapsed or was revoked and a newer holder took over);
504 when the handler ran out of time, or the client's deadline
(``X-Request-Timeout``) passed before the lock was granted; 500 when the
handler raised or returned something that is not JSON; 503 when a store is
unreachable, a save was not confirmed by ``min_replicas_acked`` replicas,
the lock was not granted within the lock store's ``wait_timeout``, or the
server's shutdown cancelled the message past ``--shutdown-timeout``.

Delivery guarantees (see the README's guarantees section):

* Exactly once by message ID. The tracker load checks the ID under the
  lock; a remembered ID is answered 200 with the stored reply, byte for
  byte, and ``Idempotent-Replayed: true``, without calling the handler. A
  repeat that arrives while the first is processed waits for the lock like
  any message, then finds the ID.
* Abandoned requests are not processed. Once the lock is granted, a
  request whose client has disconnected is released at once (outcome
  ``abandoned``, status 499, which nobody reads), unless the server runs
  with ``--process-abandoned``. The check is made when the lock is granted,
  not while waiting: the waiter keeps its place, so a client that is still
  there is served in order.
* A message whose client deadline passes while it waits is withdrawn from
  the queue (504) and never processed.

The ``Server-Timing`` header of a 200 splits the request time into
``lock`` (waiting for and acquiring the lock), ``load``, ``handler``,
``save``, ``release`` and ``total`` (milliseconds), so a client can see
what the lock costs. On the combined Redis path the load rides on the
lock's draw and the release on the save, so ``lock`` includes the load's
round trip (unless the message waited) and ``save`` the release's.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope

from ..errors import LockLostError, LockStoreUnavailable, LockTimeoutError
from ..redact import exception_summary
from .context import ServerContext
from .conversation import Conversation, Message
from .deadlines import UNBOUNDED
from .disconnect import client_disconnected
from .handlers import normalize_responses
from .message_path import MessageTurn
from .responses import ApiError, render_json
from .tracker import EncodedState, StaleTicketError, TrackerNotReplicated, TrackerStoreUnavailable, dumps
from .validation import (
    message_id_of,
    parse_json,
    read_body,
    request_deadline,
    validate_webhook,
    webhook_headers,
)

__all__ = ["Processed", "answer_webhook", "process_message", "webhook"]

#: Status of a message released because its client had gone (nginx's "client closed request").
CLIENT_GONE = 499
#: metrics outcome of each ApiError code; any other code counts as "unavailable".
_OUTCOMES = {
    "stale_ticket": "stale",
    "handler_timeout": "handler_timeout",
    "handler_error": "handler_error",
    "deadline_exceeded": "deadline",
    "client_disconnected": "abandoned",
    "not_replicated": "not_replicated",
    "message_id_unsupported": "refused",
}


@dataclass(frozen=True, slots=True)
class Processed:
    """What a processed message answers: the JSON ``body`` and whether it is a replay.

    ``responses`` is the handler's normalized responses (None for a replay,
    whose body is the stored reply exactly as first sent).
    """

    body: bytes
    replayed: bool = False
    responses: list[dict[str, Any]] | None = None

logger = logging.getLogger("convlock.server")


class _Timing:
    """Named durations of one request, rendered as a ``Server-Timing`` header."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}

    def header(self) -> str:
        """The ``Server-Timing`` value: ``name;dur=<ms>`` for each part, in the order they were timed."""
        # A list, not a generator: join() builds one from a generator first
        # anyway, and resuming the generator per item cost 2.4 us a message
        # (5.3 vs 2.9 us for the six parts).
        return ", ".join([f"{name};dur={seconds * 1000:.3f}" for name, seconds in self.parts.items()])


async def webhook(request: Request) -> Response:
    """The Starlette endpoint: :func:`answer_webhook` as a :class:`Response`.

    ``convlock run`` answers this route on :mod:`.webhook_asgi`'s raw ASGI
    path instead; this endpoint serves the requests that path leaves to the
    router (see there).
    """
    ctx: ServerContext = request.app.state.ctx
    body, headers = await answer_webhook(ctx, request.scope, request.receive)
    return Response(body, media_type="application/json", headers=headers)


async def answer_webhook(ctx: ServerContext, scope: Scope, receive: Receive) -> tuple[bytes, dict[str, str]]:
    """Validate the body, process the message; the 200 reply's JSON body and extra headers.

    Any other outcome raises :class:`ApiError` with the status and reason to answer.
    """
    timeout_header, idempotency_key, content_length = webhook_headers(scope)
    deadline = request_deadline(timeout_header, time.monotonic())
    body = await read_body(receive, content_length)
    payload = validate_webhook(parse_json(body))
    message_id = message_id_of(payload, idempotency_key)
    message = Message(payload.sender, payload.message, payload.metadata or {}, message_id)
    timing = _Timing()
    gone = None if ctx.process_abandoned else _disconnect_check(receive)
    processed = await process_message(ctx, message, timing, deadline=deadline, client_gone=gone)
    headers = {"Server-Timing": timing.header()}
    if processed.replayed:
        headers["Idempotent-Replayed"] = "true"
    return processed.body, headers


def _disconnect_check(receive: Receive) -> Callable[[bool], Awaitable[bool]]:
    """Whether the client behind ASGI ``receive`` has disconnected, without waiting.

    :func:`.disconnect.client_disconnected` polls the ASGI ``receive``
    channel once (not Starlette's ``is_disconnected``: see there why);
    uvicorn answers ``http.disconnect`` there once its protocol has seen the
    connection close. For a message that waited for its lock, one trip
    through the event loop first lets a close that arrived together with
    the grant (both ready in one poll, as after a SIGSTOP/SIGCONT) be handled
    before we ask. A message granted its lock at once (``granted_at_once``,
    from the lock store) skips that trip: it never waited, so a close racing
    its grant races its processing just the same, which no check can catch.
    Its one trip through the loop is the one before its answer is written
    (see "Writes" in :mod:`.webhook_asgi`).
    """

    async def gone(waited: bool) -> bool:
        if waited:
            await asyncio.sleep(0)
        return await client_disconnected(receive)

    return gone


async def process_message(
    ctx: ServerContext,
    message: Message,
    timing: _Timing | None = None,
    *,
    deadline: float | None = None,
    client_gone: Callable[[bool], Awaitable[bool]] | None = None,
) -> Processed:
    """Run one message through lock, load, handler, save and release.

    Returns what to answer, or raises :class:`ApiError` with the status the
    client should get. ``timing`` (optional) receives the phase durations.
    ``deadline`` (a ``time.monotonic()`` value) bounds the wait for the lock
    (504 past it, nothing processed); ``client_gone``, checked once the lock
    is granted (told whether the message may have waited for it), releases
    the lock unprocessed when it answers True (499).
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
    ctx.in_flight += 1
    ctx.idle.clear()
    outcome = "ok"
    start = time.perf_counter()
    acquired = released = 0.0
    wait_timeout = None
    try:
        if message.message_id is not None and not ctx.message_ids:
            raise ApiError(
                501,
                "message_id_unsupported",
                f"this server's tracker store ({ctx.tracker_store.describe()}) does not remember message "
                "IDs, so it cannot promise to process this message once; send it without message_id and "
                "Idempotency-Key, or configure a tracker store that supports them",
            )
        if deadline is not None:
            left = _left(deadline)
            if left is None:
                raise _deadline_passed("before it could queue for the lock")
            default = ctx.lock_store.wait_timeout
            wait_timeout = left if default is None else min(left, default)
        async with ctx.path.turn(cid, wait_timeout=wait_timeout, message_id=message.message_id) as turn:
            queued = _unqueue(ctx, cid)
            acquired = time.perf_counter()
            parts["lock"] = acquired - start
            try:
                if client_gone is not None and await client_gone(not turn.granted_at_once):
                    raise ApiError(
                        CLIENT_GONE,
                        "client_disconnected",
                        "the client disconnected before the lock was granted; the message was not "
                        "processed",
                    )
                if deadline is not None and _left(deadline) is None:
                    raise _deadline_passed("just as the lock was granted")
                processed = await _locked(ctx, message, turn, parts)
            finally:
                leaving = time.perf_counter()
        released = time.perf_counter()
        parts["release"] = released - leaving
        parts["total"] = released - start
        if processed.replayed:
            outcome = "replayed"
        return processed
    except ApiError as exc:
        outcome = _OUTCOMES.get(exc.error, "unavailable")
        raise
    except LockLostError as exc:
        # An operator revoked this message's ticket while it waited.
        outcome = "revoked"
        raise ApiError(409, "ticket_revoked", str(exc)) from None
    except LockTimeoutError as exc:
        if deadline is not None and _left(deadline) is None:
            outcome = "deadline"
            raise _deadline_passed("while it waited for the lock") from None
        outcome = "lock_timeout"
        raise ApiError(503, "lock_timeout", str(exc), headers={"Retry-After": "1"}) from None
    except TrackerNotReplicated as exc:
        outcome = "not_replicated"
        raise ApiError(503, "not_replicated", str(exc), headers={"Retry-After": "1"}) from None
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
        ctx.in_flight -= 1
        if not ctx.in_flight:
            ctx.idle.set()


#: The window a custom store that returns every event is cut to.
MAX_EVENT_HISTORY_FALLBACK = 100


def _unqueue(ctx: ServerContext, cid: str) -> bool:
    """Count one message of ``cid`` as no longer waiting; returns False (it is not queued now)."""
    left = ctx.waiting[cid] - 1
    if left:
        ctx.waiting[cid] = left
    else:
        del ctx.waiting[cid]
    return False


def _left(deadline: float) -> float | None:
    """Seconds left until ``deadline``, or None once it has passed."""
    left = deadline - time.monotonic()
    return left if left > 0 else None


def _deadline_passed(when: str) -> ApiError:
    return ApiError(
        504,
        "deadline_exceeded",
        f"the client's deadline (X-Request-Timeout) passed {when}; the message was not processed",
    )


async def _locked(
    ctx: ServerContext, message: Message, hold: MessageTurn, parts: dict[str, float]
) -> Processed:
    """The part of a message's processing that runs while holding the lock."""
    metrics = ctx.metrics
    cid = message.sender
    ticket = hold.ticket
    t0 = time.perf_counter()
    try:
        record = await hold.load()
    except StaleTicketError as exc:
        raise ApiError(409, "stale_ticket", str(exc)) from None
    t1 = time.perf_counter()
    parts["load"] = t1 - t0
    metrics.tracker_seconds.labels("load").observe(t1 - t0)
    if record.replay is not None:
        return Processed(record.replay.encode("utf-8"), replayed=True)

    # The turn and the event count are stored: nothing here depends on how
    # long the conversation is (a store without them gets counted, once).
    turn = record.turns() + 1
    window = record.events
    if record.event_count is None:  # a custom store that returns every event
        window = window[-MAX_EVENT_HISTORY_FALLBACK:]

    async def pager(after: int, limit: int) -> list[dict[str, Any]]:
        return await ctx.tracker_store.events(cid, after=after, limit=limit)

    conversation = Conversation(
        cid,
        window,
        record.state,
        turn,
        ticket,
        len(record.events) if record.event_count is None else record.event_count,
        pager,
    )
    # One timer shared by every message's handler call, not one each (see .deadlines).
    deadlines = ctx.handler_deadlines
    timeout = UNBOUNDED if deadlines is None else deadlines.timeout()
    try:
        with timeout:
            result = await ctx.handler(message, conversation)
        responses = normalize_responses(result, cid)
        # Prove the results are JSON before anything is saved (the body is
        # the proof for the responses: it fails on what dumps fails on). The
        # state's proof is its text, which the built-in stores then save.
        body = render_json(responses)
        state = EncodedState(conversation.state, dumps(conversation.state))
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
    # Every event names its message: the client's ID, or one made up here so
    # that a tracker can always tell which bot events answered which message.
    # 32 hex digits like uuid4().hex. Not a secret, so from the random
    # module (reseeded in each forked worker) rather than os.urandom: a
    # system call per message cost 5-6 us of a 350 us message (py-spy).
    event_message_id = message.message_id or f"{random.getrandbits(128):032x}"
    user_event: dict[str, Any] = {
        "event": "user",
        "text": message.text,
        "turn": turn,
        "ticket": ticket,
        "message_id": event_message_id,
        "timestamp": now,
    }
    if message.metadata:
        user_event["metadata"] = dict(message.metadata)
    bot_events = [
        {
            "event": "bot",
            "turn": turn,
            "message_id": event_message_id,
            "timestamp": now,
            **{k: v for k, v in response.items() if k not in ("recipient_id", "message_id")},
        }
        for response in responses
    ]
    new_events = [user_event, *bot_events]
    try:
        reply = None if message.message_id is None else body.decode("ascii")
        await hold.save(new_events, state, reply)
    except StaleTicketError as exc:
        raise ApiError(409, "stale_ticket", str(exc)) from None
    t3 = time.perf_counter()
    parts["save"] = t3 - t2
    metrics.tracker_seconds.labels("save").observe(t3 - t2)
    return Processed(body, responses=responses)


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
