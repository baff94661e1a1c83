"""Who may call which route: one ASGI middleware in front of every route, closed by default.

Every request passes through :class:`AccessMiddleware` before routing. It
finds the route the request would reach (the app's own route table, so a
route added later is covered with no further work) and gives it a class:

* ``open``: anyone. Only the routes listed in :data:`OPEN_ROUTES`: the chat
  channel, ``GET /`` (name and version) and ``GET /health`` (whose details
  are shown only to a caller who may see private routes; see
  :func:`is_trusted`). ``GET /metrics`` joins them with ``--metrics-public``.
* ``private``: any other ``GET``/``HEAD``, and unknown paths. With
  ``--auth-token`` set, they need the token. Without one, they answer only a
  *local* caller (see below) and everyone else gets 403.
* ``admin``: any other method (force-release, and whatever write route is
  added later). Always needs the token; without a configured token they are
  off (403 saying to set ``--auth-token``).

The token comes as ``Authorization: Bearer <token>`` or ``?token=<token>``
(the spec's framework's way) and is compared in constant time.

A caller is *local* when the server listens on a loopback address only, the
connection comes from a loopback address, and the request carries no
``Forwarded``/``X-Forwarded-For``/``X-Real-IP`` header: a reverse proxy on
the same host that forwards public traffic to a loopback bind is not local.
``CONVLOCK_TREAT_BIND_AS_PUBLIC=1`` makes a loopback bind count as public
(for tests on machines with no other address; it only ever closes routes).

The chat channel can be authenticated too: ``--webhook-token`` (same two
ways of sending it) and/or ``--webhook-hmac-secret``, an
``X-Convlock-Signature: sha256=<hex>`` header carrying HMAC-SHA256 of the
raw body. When both are set, either one lets a message in. The body is read
(up to the channel's limit) and checked before the channel sees a byte.
Open question: the signature carries no timestamp, so a captured request
can be replayed; the message ID of the delivery work (issue 14) is what
makes a replay harmless.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import ipaddress
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .responses import JSONResponse, error_response
from .validation import MAX_BODY_BYTES

__all__ = [
    "FORCE_PUBLIC_ENV",
    "NOSNIFF",
    "OPEN_ROUTES",
    "SIGNATURE_HEADER",
    "Access",
    "AccessMiddleware",
    "AccessSettings",
    "WEBHOOK_PATH",
    "admit_webhook",
    "is_loopback_host",
    "is_trusted",
    "sign_body",
    "with_nosniff",
]

#: Set to 1 to treat a loopback bind as public (tests on machines with only a loopback address).
FORCE_PUBLIC_ENV = "CONVLOCK_TREAT_BIND_AS_PUBLIC"
#: The header that carries the webhook body's HMAC: ``sha256=<hex digest>``.
SIGNATURE_HEADER = "X-Convlock-Signature"
#: The chat channel's path.
WEBHOOK_PATH = "/webhooks/rest/webhook"

#: (method, route template) pairs anyone may call. Everything else is closed.
OPEN_ROUTES: frozenset[tuple[str, str]] = frozenset(
    {("POST", WEBHOOK_PATH), ("GET", "/"), ("GET", "/health")}
)
_FORWARDING_NAMES = frozenset({b"forwarded", b"x-forwarded-for", b"x-real-ip"})
#: Request scope key set to True when the caller may see private routes.
_TRUSTED = "convlock.trusted"


class Access(enum.Enum):
    """A route's class: who may call it (see the module docstring)."""

    OPEN = "open"
    PRIVATE = "private"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class AccessSettings:
    """The access options of one server; secrets stay out of the repr.

    ``local_bind`` is true when the server listens on loopback addresses only.
    """

    auth_token: str | None = field(default=None, repr=False)
    webhook_token: str | None = field(default=None, repr=False)
    webhook_hmac_secret: str | None = field(default=None, repr=False)
    metrics_public: bool = False
    local_bind: bool = True

    def classify(self, method: str, template: str | None) -> Access:
        """The class of ``method`` on the route ``template`` (None: no route matched)."""
        method = "GET" if method == "HEAD" else method
        if template is not None and (method, template) in OPEN_ROUTES:
            return Access.OPEN
        if template == "/metrics" and self.metrics_public and method == "GET":
            return Access.OPEN
        return Access.PRIVATE if method == "GET" else Access.ADMIN


def is_loopback_host(host: str) -> bool:
    """Whether binding to ``host`` listens on loopback addresses only (names are resolved)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses)


def local_bind(host: str) -> bool:
    """``is_loopback_host(host)``, unless :data:`FORCE_PUBLIC_ENV` says to treat every bind as public."""
    return is_loopback_host(host) and os.environ.get(FORCE_PUBLIC_ENV, "") not in {"1", "true", "yes"}


def sign_body(secret: str, body: bytes) -> str:
    """The :data:`SIGNATURE_HEADER` value for ``body``: ``sha256=`` and the HMAC-SHA256 hex digest."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def is_trusted(request: Request) -> bool:
    """Whether this request's caller may see private routes (used by open routes to show details)."""
    return bool(request.scope.get(_TRUSTED, False))


def _scan_headers(scope: Scope) -> tuple[str, bool]:
    """The ``Authorization`` header (first one, or ""), and whether a forwarding header is present.

    One pass over the raw (lower-case) names, where Starlette's ``Headers``
    would scan once per name asked, and raise and catch a KeyError for each
    absent one: three or four scans on every request.
    """
    authorization: bytes | None = None
    forwarded = False
    for name, value in scope["headers"]:
        if name == b"authorization":
            if authorization is None:
                authorization = value
        elif name in _FORWARDING_NAMES:
            forwarded = True
    return ("" if authorization is None else authorization.decode("latin-1")), forwarded


def _given_token(scope: Scope, authorization: str) -> str | None:
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    query = scope.get("query_string", b"")
    if not query:
        return None
    for name, value in parse_qsl(bytes(query).decode("latin-1"), keep_blank_values=True):
        if name == "token":
            return value
    return None


def _same(given: str | None, expected: str | None) -> bool:
    if given is None or expected is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


def _is_local_client(scope: Scope, forwarded: bool) -> bool:
    if forwarded:
        return False
    client = scope.get("client")
    if not client:
        return False
    return _is_loopback_address(str(client[0]))


@functools.lru_cache(maxsize=1024)
def _is_loopback_address(address: str) -> bool:
    # Cached: ipaddress parses in Python (about 9 us a request), and a
    # server sees the same few peers (its proxy, its load balancer) again and again.
    try:
        return ipaddress.ip_address(address.partition("%")[0]).is_loopback
    except ValueError:
        return False


class AccessMiddleware:
    """Applies :class:`AccessSettings` to every HTTP request before it reaches a route."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute], settings: AccessSettings) -> None:
        self.app = app
        self.routes = routes  # the app's live list: routes added later are classified too
        self.settings = settings

    def _route(self, scope: Scope) -> tuple[str | None, bool]:
        """The template of the route the request reaches (None: none), and whether its method is wrong."""
        partial = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                # Known now, so that a refusal is counted under its route in the metrics.
                scope.setdefault("route", route)
                return str(getattr(route, "path", "")) or None, False
            if match is Match.PARTIAL and partial is None:
                partial = route
        if partial is not None:
            return str(getattr(partial, "path", "")) or None, True
        return None, False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _nosniff(send)
        settings = self.settings
        authorization, forwarded = _scan_headers(scope)
        method = scope["method"]
        template, wrong_method = self._route(scope)
        access = settings.classify(method, template)
        if wrong_method and any(path == template for _, path in OPEN_ROUTES):
            access = Access.OPEN  # a 405 from an open path holds no data; let the router say it
        given = _given_token(scope, authorization)
        local = settings.local_bind and _is_local_client(scope, forwarded)
        trusted = _same(given, settings.auth_token) if settings.auth_token is not None else local
        scope[_TRUSTED] = trusted

        if access is Access.OPEN:
            if template == WEBHOOK_PATH and method == "POST" and not wrong_method:
                await self._webhook(scope, receive, send, given)
                return
            await self.app(scope, receive, send)
            return
        if settings.auth_token is None:
            if access is Access.ADMIN:
                reason = (
                    f"{method} here changes state and is disabled; start convlock run with "
                    "--auth-token (or $CONVLOCK_AUTH_TOKEN) to enable it"
                )
                if template == "/locks/{conversation_id:conversation_id}":
                    reason = "force-release is disabled; start convlock run with --auth-token to enable it"
                await error_response(403, "forbidden", reason)(scope, receive, send)
                return
            if not local:
                await error_response(
                    403,
                    "forbidden",
                    "this route shows conversation data or IDs and is off on a server that listens on a "
                    "non-loopback address without a token (or behind a proxy); start convlock run with "
                    "--auth-token (or $CONVLOCK_AUTH_TOKEN) and send it as 'Authorization: Bearer <token>'",
                )(scope, receive, send)
                return
        elif not trusted:
            await _unauthorized(given, "--auth-token")(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _webhook(self, scope: Scope, receive: Receive, send: Send, given: str | None) -> None:
        admitted, refusal = await admit_webhook(self.settings, scope, receive, given)
        if refusal is not None:
            await refusal(scope, receive, send)
        elif admitted is not None:
            await self.app(scope, admitted, send)
        # else the client left while its body was read; nobody reads an answer


async def admit_webhook(
    settings: AccessSettings, scope: Scope, receive: Receive, given: str | None = None
) -> tuple[Receive | None, JSONResponse | None]:
    """Check a chat channel request against ``--webhook-token`` and ``--webhook-hmac-secret``.

    Returns ``(receive, None)`` to let it in (a ``receive`` that replays the
    body if it was read to check the signature), ``(None, refusal)`` to
    refuse it, or ``(None, None)`` when the client left while its body was
    read. ``given`` is the token the request carries, if the caller has
    already looked it up.
    """
    token, secret = settings.webhook_token, settings.webhook_hmac_secret
    if token is None and secret is None:
        return receive, None
    if given is None:
        given = _given_token(scope, _scan_headers(scope)[0])
    if token is not None and _same(given, token):
        return receive, None
    headers = Headers(scope=scope)
    signature = headers.get(SIGNATURE_HEADER)
    if secret is None or signature is None:
        return None, _unauthorized(given, "--webhook-token", signed=secret is not None)
    # Read the whole body (bounded) before the channel sees any of it.
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return receive, None  # refused by the channel by its declared length, unread
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, None  # the client left; nobody reads an answer
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None, error_response(
                413, "body_too_large", f"the body exceeds the limit of {MAX_BODY_BYTES} bytes (1 MiB)"
            )
        chunks.append(chunk)
        more = bool(message.get("more_body", False))
    body = b"".join(chunks)
    expected = sign_body(secret, body).encode("ascii")
    if not hmac.compare_digest(signature.strip().encode("utf-8", "replace"), expected):
        return None, error_response(
            401,
            "unauthorized",
            f"the {SIGNATURE_HEADER} header does not match the body; send 'sha256=' and the hex "
            "HMAC-SHA256 of the exact body bytes, keyed with the --webhook-hmac-secret",
        )
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay, None


#: The header every response carries (see :func:`with_nosniff`).
NOSNIFF = (b"x-content-type-options", b"nosniff")


def with_nosniff(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Raw ASGI ``headers`` with any ``X-Content-Type-Options`` replaced by ``nosniff``, last."""
    return [*((k, v) for k, v in headers if k.lower() != NOSNIFF[0]), NOSNIFF]


def _nosniff(send: Send) -> Send:
    """Wrap ``send`` so every response says ``X-Content-Type-Options: nosniff``.

    Replies echo IDs and paths inside JSON; a browser must never sniff such a
    reply into HTML and run markup from it.
    """

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": with_nosniff(message.get("headers", []))}
        await send(message)

    return wrapped


def _unauthorized(given: str | None, flag: str, *, signed: bool = False) -> JSONResponse:
    if given is None:
        how = f"give the {flag} as 'Authorization: Bearer <token>' or '?token=<token>'"
        if signed:
            how += f", or sign the body in the {SIGNATURE_HEADER} header"
        reason = how
    else:
        reason = "the token is wrong"
    return error_response(401, "unauthorized", reason, headers={"WWW-Authenticate": "Bearer"})
