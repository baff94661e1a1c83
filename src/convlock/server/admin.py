"""Read and admin endpoints: health, tracker, locks, force-release, metrics.

Who may call them is decided before routing, by :mod:`.access`: every one
but ``/health`` needs the ``--auth-token`` when one is set, and
force-release is off without one. ``/health`` is open as a probe and shows
its per-store details only to a caller :func:`~.access.is_trusted` admits.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.requests import Request
from starlette.responses import Response

from ..errors import LockError
from ..ids import check_conversation_id
from .access import is_trusted
from .context import ServerContext
from .metrics import CONTENT_TYPE
from .responses import ApiError, JSONResponse
from .tracker import TrackerStoreUnavailable

__all__ = ["force_release", "health", "inspect_lock", "list_locks", "metrics", "tracker"]

#: At most this many locks are listed by ``GET /locks``; the reply says if it was cut.
MAX_LISTED_LOCKS = 1000
#: A store that does not answer a health ping within this many seconds counts as down.
HEALTH_TIMEOUT = 5.0


def _ctx(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.ctx
    return ctx


def _conversation_id(request: Request) -> str:
    raw = request.path_params["conversation_id"]
    if "\ufffd" in raw:
        # The server decodes %-escapes leniently, turning bytes that are not
        # UTF-8 into U+FFFD: "%ff" would name the conversation "\ufffd".
        try:
            unquote_to_bytes(request.scope.get("raw_path") or b"").decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(
                422,
                "invalid_conversation_id",
                "the conversation ID in the path is not valid UTF-8 once %-decoded; "
                "percent-encode the ID's UTF-8 bytes",
            ) from None
    try:
        return check_conversation_id(raw)
    except ValueError as exc:
        raise ApiError(422, "invalid_conversation_id", str(exc)) from None


async def health(request: Request) -> Response:
    """200 when both stores answer a ping, else 503.

    A trusted caller (see :func:`~.access.is_trusted`) also gets each store's
    backend and the reason it is down; anyone else only the overall status.
    """
    ctx = _ctx(request)
    report: dict[str, object] = {}
    healthy = True
    for name, store, ping in (
        ("lock_store", ctx.lock_store, ctx.lock_store.ping),
        ("tracker_store", ctx.tracker_store, ctx.tracker_store.ping),
    ):
        backend = str(store.statistics().get("backend", type(store).__name__))
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                await ping()
            report[name] = {"status": "ok", "backend": backend}
        except (LockError, TrackerStoreUnavailable, ConnectionError, TimeoutError) as exc:
            healthy = False
            report[name] = {
                "status": "unavailable",
                "backend": backend,
                "reason": str(exc) or type(exc).__name__,
            }
    body: dict[str, object] = {"status": "ok" if healthy else "unavailable"}
    if is_trusted(request):
        body.update(report)
    return JSONResponse(body, status_code=200 if healthy else 503)


#: Events per page of ``GET /conversations/{id}/tracker``: the default and the most.
TRACKER_PAGE = 100
TRACKER_PAGE_MAX = 1000


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ApiError(
            422, "invalid_request", f"?{name}= must be a whole number from {low} to {high}, got {raw!r}"
        )
    return value


async def tracker(request: Request) -> Response:
    """One page of the conversation's stored events, its state, last applied ticket and fence.

    ``?after=N`` (default 0) starts after event number N (events count from
    1), ``?limit=`` (default 100, at most 1000) bounds the page; the reply's
    ``next_after`` is the ``after`` of the next page, or null on the last.
    Each page is read on its own, so a long history never makes one huge reply.
    """
    ctx = _ctx(request)
    cid = _conversation_id(request)
    after = _query_int(request, "after", 0, 0, 2**62)
    limit = _query_int(request, "limit", TRACKER_PAGE, 1, TRACKER_PAGE_MAX)
    try:
        record = await ctx.tracker_store.load(cid)
        events = await ctx.tracker_store.events(cid, after=after, limit=limit)
    except TrackerStoreUnavailable as exc:
        raise ApiError(503, "store_unavailable", str(exc)) from None
    body = record.as_dict()
    count = body["event_count"]
    retained_from = count - (ctx.tracker_store.retain_events or count) + 1
    first = max(after + 1, retained_from, 1)
    last = first + len(events) - 1
    body["events"] = events
    body["after"] = after
    body["next_after"] = last if events and last < count else None
    return JSONResponse(body)


async def list_locks(request: Request) -> Response:
    """Snapshots of the conversations that are locked or have waiters now."""
    ctx = _ctx(request)
    locks: list[dict[str, Any]] = []
    truncated = False
    try:
        async for cid in ctx.lock_store.conversations():
            if len(locks) >= MAX_LISTED_LOCKS:
                truncated = True
                break
            snapshot = await ctx.lock_store.inspect(cid)
            if snapshot is not None:
                locks.append(snapshot.as_dict())
    except LockError as exc:
        raise ApiError(503, "store_unavailable", str(exc)) from None
    return JSONResponse({"locks": locks, "truncated": truncated})


async def inspect_lock(request: Request) -> Response:
    """One conversation's queue; ``serving`` is null when nothing is held."""
    ctx = _ctx(request)
    cid = _conversation_id(request)
    try:
        snapshot = await ctx.lock_store.inspect(cid)
    except LockError as exc:
        raise ApiError(503, "store_unavailable", str(exc)) from None
    if snapshot is None:
        return JSONResponse({"conversation_id": cid, "serving": None, "waiting": []})
    return JSONResponse(snapshot.as_dict())


async def force_release(request: Request) -> Response:
    """Revoke the conversation's holder and serve the next ticket (the access layer demands the token)."""
    ctx = _ctx(request)
    cid = _conversation_id(request)
    try:
        revoked = await ctx.lock_store.force_release(cid)
    except LockError as exc:
        raise ApiError(503, "store_unavailable", str(exc)) from None
    return JSONResponse({"conversation_id": cid, "revoked_ticket": revoked})


async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this process's metrics."""
    return Response(_ctx(request).metrics.render(), media_type=CONTENT_TYPE)
