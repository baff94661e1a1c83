"""Assembling the Starlette app: routes, JSON errors, metrics middleware, lifespan.

``build_app(ctx)`` serves one :class:`ServerContext`; the app closes the
context's stores when it shuts down. ``app_from_environment()`` is the
factory uvicorn's worker processes call (``--workers N``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..observe import LockEventLog
from ..redact import install_log_redaction
from . import admin, status
from .access import AccessMiddleware
from .channel import webhook
from .context import ServerContext
from .openapi import openapi_document
from .options import ServerOptions, build_context
from .responses import ApiError, JSONResponse, error_response, unexpected_error_response
from .webhook_asgi import WebhookFastPath

__all__ = ["app_from_environment", "build_app", "tune_gc_for_serving"]

logger = logging.getLogger("convlock.server")


#: Methods counted under their own name; any other (clients may send any token) counts as OTHER,
#: so that no client can add label values, and so series, at will.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"})
#: At shutdown, how long to wait for messages cancelled past the graceful timeout to release
#: their locks before the stores are closed.
RELEASE_GRACE = 10.0
#: The garbage collector's first-generation threshold in a serving process (see tune_gc_for_serving).
GC_THRESHOLD = 10_000


class _MetricsMiddleware:
    """Counts and times every HTTP request by its route template and status."""

    def __init__(self, app: ASGIApp, ctx: ServerContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            template = _route_template(scope)
            # Templates read "{conversation_id:conversation_id}"; drop the convertor's name.
            template = template.replace(":conversation_id}", "}")
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            self.ctx.metrics.observe_request(method, template, status, time.perf_counter() - start)


def _route_template(scope: Scope) -> str:
    """The path template of the route that served ``scope``, or ``"unmatched"``."""
    route = scope.get("route")
    if route is None:
        # Starlette 1.3 (the series Rasa Pro 3.21 pins) does not record the
        # matched route in the scope: match again, as the router did.
        partial = None
        for candidate in getattr(scope.get("app"), "routes", ()):
            match, _ = candidate.matches(scope)
            if match is Match.FULL:
                route = candidate
                break
            if match is Match.PARTIAL and partial is None:
                partial = candidate  # the path matched, the method did not (a 405)
        route = route or partial
    return getattr(route, "path", None) or "unmatched"


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        reason = f"no such route: {request.method} {request.url.path}; see /openapi.json"
        return error_response(404, "not_found", reason)
    if exc.status_code == 405:
        headers = dict(exc.headers or {})
        return error_response(
            405, "method_not_allowed", f"{request.method} is not allowed here", headers=headers
        )
    return error_response(exc.status_code, "http_error", str(exc.detail))


async def _unexpected(request: Request, exc: Exception) -> Response:
    return unexpected_error_response(request.method, request.url.path, exc)


class _ConversationIdConvertor(Convertor[str]):
    """Matches any conversation ID in a path: slashes and newlines included.

    Starlette's ``path`` convertor is ``.*``, which stops at a newline, and a
    newline is a valid character of a conversation ID.
    """

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("conversation_id", _ConversationIdConvertor())


def _routes() -> list[BaseRoute]:
    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document(__version__))

    async def root(request: Request) -> Response:
        return JSONResponse({"name": "convlock", "version": __version__, "openapi": "/openapi.json"})

    # The chat channel first: the access middleware and the router each try
    # the routes in order, and nearly every request is a message.
    return [
        Route("/webhooks/rest/webhook", webhook, methods=["POST"]),
        Route("/", root, methods=["GET"]),
        Route("/health", admin.health, methods=["GET"]),
        Route("/conversations/{conversation_id:conversation_id}/tracker", admin.tracker, methods=["GET"]),
        Route("/locks", admin.list_locks, methods=["GET"]),
        Route("/locks/{conversation_id:conversation_id}", admin.inspect_lock, methods=["GET"]),
        Route("/locks/{conversation_id:conversation_id}", admin.force_release, methods=["DELETE"]),
        Route("/metrics", admin.metrics, methods=["GET"]),
        Route("/status", status.status, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]


class _App(Starlette):
    """Starlette, with the chat channel's messages answered in front of it by :mod:`.webhook_asgi`."""

    fast_path: WebhookFastPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast_path = self.fast_path
        if fast_path is not None and fast_path.serves(scope):
            await fast_path(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def build_app(ctx: ServerContext, *, fast_webhook: bool = True) -> Starlette:
    """The ASGI app serving ``ctx``; it closes ``ctx``'s stores on shutdown.

    ``fast_webhook=False`` leaves the chat channel to the Starlette route
    too (the tests compare the two paths' answers).
    """
    ctx.metrics.bind_stores(ctx.lock_store.statistics, ctx.tracker_store.statistics)
    # The library's lock collectors and event log, fed by the store itself.
    ctx.lock_store.add_observer(ctx.metrics.locks)
    ctx.lock_store.add_observer(LockEventLog())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # By now uvicorn (and any worker process) has set up its log handlers.
        install_log_redaction()
        yield
        # The server has stopped accepting and the requests in flight have
        # finished, or were cancelled past the graceful timeout. uvicorn does
        # not wait for cancelled requests to unwind, so wait here until each
        # has left its ``async with`` (releasing its lock) before the stores close.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RELEASE_GRACE):
                await ctx.idle.wait()
        if ctx.in_flight:
            logger.warning("closing the stores with %d messages still in flight", ctx.in_flight)
        await ctx.lock_store.aclose()
        await ctx.tracker_store.aclose()
        logger.info("stores closed")

    app = _App(
        routes=_routes(),
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _unexpected},
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    app.state.status_rates = status.RateMeter(ctx.metrics.registry)
    # Inside the metrics middleware, so refusals are counted; it reads the live
    # route list, so routes added after this line are closed by default too.
    app.add_middleware(AccessMiddleware, routes=app.routes, settings=ctx.access)
    app.add_middleware(_MetricsMiddleware, ctx=ctx)
    if fast_webhook:
        app.fast_path = WebhookFastPath(ctx)
    return app


def app_from_environment() -> Starlette:
    """The app of one uvicorn worker process, built from ``CONVLOCK_RUN_OPTIONS``."""
    options = ServerOptions.from_environment()
    options.configure_logging()  # a spawned worker does not inherit the parent's handlers
    app = build_app(build_context(options))
    tune_gc_for_serving()
    return app


def tune_gc_for_serving() -> None:
    """Set up the garbage collector of a process that is about to serve requests; call it once.

    Call it after the app is built and before requests arrive. Two things,
    each from profiling ``convlock run`` under the bench's 16 conversations
    (gc callbacks, 8,000 messages, in memory): about 17 us per message went
    to collections, and two or three full ones took 30-60 ms each, a pause
    for every message in flight.

    * ``gc.freeze()`` (after a collection, so that no garbage is frozen):
      modules, the app and its stores live as long as the process, yet each
      full collection walked them all, some 53,000 objects.
    * A first-generation threshold of :data:`GC_THRESHOLD` instead of 700:
      the requests in flight hold more than 700 containers between them, so
      a young collection ran every few messages and, finding them alive,
      promoted them toward the full collections. The count is allocations
      minus deallocations, so a request that frees what it made does not add
      up; at 10,000 no collection ran in those 8,000 messages. Cyclic garbage
      (the handler's, too) waits a little longer to be freed.
    """
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, second, third)
