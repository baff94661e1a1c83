"""Reading and validating request bodies without trusting them.

The body is read in chunks and abandoned as soon as it passes the limit
(``Content-Length`` is checked first, so a declared oversize body is refused
before any of it is read); a client that disconnects before sending all of
it gets a 400 (which it will never read) rather than an error in the log.
JSON is parsed strictly: no ``NaN``/``Infinity``, no overflowing numbers, no
lone surrogates, at most :data:`MAX_JSON_DEPTH` levels of nesting, so
whatever is accepted can be stored and echoed as JSON again, wrapped in the
few levels that events and the tracker reply add.
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from starlette.types import Receive, Scope

from ..ids import check_conversation_id
from .responses import ApiError
from .tracker import check_message_id

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_JSON_DEPTH",
    "WebhookHeaders",
    "WebhookRequest",
    "message_id_of",
    "parse_json",
    "read_body",
    "request_deadline",
    "validate_webhook",
    "webhook_headers",
]

#: Longest deadline a client may send in ``X-Request-Timeout``, in seconds (a day).
MAX_REQUEST_TIMEOUT = 86_400.0

MAX_BODY_BYTES = 1024 * 1024
#: Most levels of arrays and objects a body may nest, the body object included.
#: Far below the interpreter's recursion limit, so that encoding what was
#: accepted (inside an event, inside the tracker reply) can never recurse too deep.
MAX_JSON_DEPTH = 100


async def read_body(receive: Receive, declared: str | None, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body from ASGI ``receive``, or :class:`ApiError` 413 once it is known to exceed ``limit`` bytes.

    ``declared`` is the request's ``Content-Length`` header (None without one).
    """
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "bad_request", "Content-Length is not a number") from None
        if size > limit:
            raise ApiError(
                413, "body_too_large", f"the body is {size} bytes; the limit is {limit} bytes (1 MiB)"
            )
    # ASGI's receive() directly, as Request.stream() would call it, without
    # the async generator around it (a chat message is one chunk).
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(
                400, "incomplete_body", f"the client disconnected after {total} bytes, before the body ended"
            )
        if message["type"] != "http.request":
            continue
        chunk: bytes = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "body_too_large", f"the body exceeds the limit of {limit} bytes (1 MiB)")
        if not message.get("more_body", False):
            if not chunks:
                return chunk
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


def _too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests arrays and objects more than ``limit`` levels (iteratively)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is out of range")
    return value


#: Built once: ``json.loads`` with options builds a new decoder and scanner per call.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def parse_json(body: bytes) -> Any:
    """Parse strict JSON, or raise :class:`ApiError` 400 saying why it is not."""
    if not body:
        raise ApiError(400, "invalid_json", "the body is empty; send a JSON object")
    try:
        text = body.decode("utf-8")
        if text.startswith("\ufeff"):  # what json.loads says, which the decoder alone does not check
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        value = _DECODER.decode(text)
        # Nesting needs an opening bracket per level, so a body with few of
        # them (every chat message) skips the walk.
        if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _too_deep(value, MAX_JSON_DEPTH):
            raise RecursionError
        # Re-encoding proves the value can be stored and echoed: it fails on
        # lone surrogates ("\ud800"). Strict UTF-8 decoding already refused
        # encoded surrogates, so only a \u escape can make one: a body
        # without any skips the second encoding.
        if b"\\u" in body:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeError:
        raise ApiError(
            400, "invalid_json", "the body is not valid UTF-8 text (or holds a lone surrogate)"
        ) from None
    except RecursionError:
        raise ApiError(
            400, "invalid_json", f"the JSON is nested too deeply (at most {MAX_JSON_DEPTH} levels)"
        ) from None
    except ValueError as exc:  # json.JSONDecodeError, int digit limits, refused constants
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    return value


class WebhookRequest(BaseModel):
    """The body of ``POST /webhooks/rest/webhook``.

    ``sender`` names the conversation (non-empty, at most 4096 UTF-8 bytes);
    ``message`` is the text; ``metadata`` is an optional JSON object passed
    to the handler and stored with the event; ``message_id`` (optional, 1 to
    256 UTF-8 bytes) makes the message exactly-once: a repeat of an ID the
    conversation remembers is answered with the stored reply and not
    processed again. Unknown keys are ignored.
    """

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    sender: str
    message: str
    metadata: dict[str, Any] | None = None
    message_id: str | None = None

    @field_validator("sender")
    @classmethod
    def _check_sender(cls, value: str) -> str:
        return check_conversation_id(value)

    @field_validator("message_id")
    @classmethod
    def _check_message_id(cls, value: str | None) -> str | None:
        return None if value is None else check_message_id(value)


def validate_webhook(payload: Any) -> WebhookRequest:
    """Validate a parsed body, or raise :class:`ApiError` 422 naming each bad field."""
    if not isinstance(payload, dict):
        raise ApiError(
            422,
            "invalid_request",
            f"the body must be a JSON object with 'sender' and 'message', got {_kind(payload)}",
        )
    try:
        return WebhookRequest.model_validate(payload)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "body"
            problems.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
        raise ApiError(422, "invalid_request", "; ".join(problems)) from None


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def message_id_of(payload: WebhookRequest, idempotency_key: str | None) -> str | None:
    """The message's ID: the body's ``message_id`` or the ``Idempotency-Key`` header.

    Both may be given if they agree; a header that is not a valid ID, or
    one that contradicts the body, is a 422 naming it.
    """
    if idempotency_key is None:
        return payload.message_id
    try:
        check_message_id(idempotency_key)
    except ValueError as exc:
        raise ApiError(422, "invalid_request", f"Idempotency-Key header: {exc}") from None
    if payload.message_id is not None and payload.message_id != idempotency_key:
        raise ApiError(
            422,
            "invalid_request",
            "the Idempotency-Key header and the body's message_id differ; they mean the same thing, "
            "so send one of them, or the same value in both",
        )
    return idempotency_key


class WebhookHeaders(NamedTuple):
    """The request headers the chat channel reads (the first of each name, or None)."""

    request_timeout: str | None
    idempotency_key: str | None
    content_length: str | None


def webhook_headers(scope: Scope) -> WebhookHeaders:
    """The request's ``X-Request-Timeout``, ``Idempotency-Key`` and ``Content-Length``.

    One pass over the raw (lower-case) names: Starlette's ``headers.get``
    scans once per name and raises and catches a KeyError for each absent
    one, and chat clients rarely send the first two (5.9 vs 0.4 us here).
    """
    timeout = key = length = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            if length is None:
                length = value.decode("latin-1")
        elif name == b"x-request-timeout":
            if timeout is None:
                timeout = value.decode("latin-1")
        elif name == b"idempotency-key" and key is None:
            key = value.decode("latin-1")
    return WebhookHeaders(timeout, key, length)


def request_deadline(header: str | None, arrived: float) -> float | None:
    """The monotonic deadline an ``X-Request-Timeout: <seconds>`` header sets, counted from ``arrived``.

    None without the header; a 400 naming the header for anything but a
    positive number of seconds up to a day.
    """
    if header is None:
        return None
    try:
        seconds = float(header.strip())
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_REQUEST_TIMEOUT:
        raise ApiError(
            400,
            "bad_request",
            f"X-Request-Timeout must be a positive number of seconds up to {MAX_REQUEST_TIMEOUT:g}, "
            f"got {header[:40]!r}",
        )
    return arrived + seconds
