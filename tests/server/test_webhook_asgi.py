"""The chat channel's raw ASGI path answers exactly as the Starlette route it stands in front of.

``convlock run`` answers ``POST /webhooks/rest/webhook`` with
:mod:`convlock.server.webhook_asgi`; ``starlette_route_server.py`` serves the
same app with that path switched off, so the router's webhook endpoint
answers. Both get the same requests over real HTTP and must answer with the
same status, the same headers in the same order (the ``Date`` aside, and
``Server-Timing``'s durations) and the same body, and count them the same
in ``/metrics``. Every other test in this folder runs against
``convlock run``, so the fast path also keeps every behaviour they check
(deadlines, disconnects, back-pressure, replays, shutdown).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from server_procs import HERE, ServerProcess, launch, start_server

import redis_procs
from convlock.memory import InMemoryLockStore
from convlock.server.access import SIGNATURE_HEADER, sign_body
from convlock.server.app import build_app
from convlock.server.context import ServerContext
from convlock.server.handlers import demo_handler
from convlock.server.tracker import InMemoryTrackerStore
from convlock.server.validation import MAX_BODY_BYTES
from convlock.server.webhook_asgi import WebhookFastPath

WEBHOOK = "/webhooks/rest/webhook"
TOKEN = "fast-path-token-51c2"
SECRET = "fast-path-hmac-secret-9d0e"


def _starlette_server(log_dir: Path, *args: str) -> ServerProcess:
    port = redis_procs.free_port()
    argv = [sys.executable, str(HERE / "starlette_route_server.py"), "--port", str(port), *args]
    return launch(argv, log_dir / f"starlette-{port}.log", port)


def _pair(log_dir: Path, *flags: str) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """``convlock run`` and the Starlette route, both started with ``flags``."""
    fast = start_server(log_dir, *flags)
    try:
        reference = _starlette_server(log_dir, *flags)
        try:
            yield fast, reference
        finally:
            reference.stop()  # uvicorn.run re-raises SIGTERM: -15, where convlock run exits 0
    finally:
        assert fast.stop() == 0, fast.log()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """(convlock run, the Starlette route) with no webhook credentials."""
    yield from _pair(tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def guarded_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """The same pair with ``--webhook-token`` and ``--webhook-hmac-secret``."""
    yield from _pair(
        tmp_path_factory.mktemp("guarded"), "--webhook-token", TOKEN, "--webhook-hmac-secret", SECRET
    )


def _answer(server: ServerProcess, method: str, request: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
    with httpx.Client(timeout=30) as client:
        reply = client.request(method, f"{server.url}{request.get('path', WEBHOOK)}", **request["send"])
    headers = []
    for name, value in reply.headers.raw:
        text_name, text_value = name.decode("latin-1"), value.decode("latin-1")
        if text_name == "date":
            continue
        if text_name == "server-timing":
            text_value = re.sub(r"dur=[0-9.]+", "dur=*", text_value)
        headers.append((text_name, text_value))
    return reply.status_code, headers, reply.content


def _same_answers(pair: tuple[ServerProcess, ServerProcess], method: str, request: dict[str, Any]) -> int:
    fast, reference = pair
    got = _answer(fast, method, request)
    expected = _answer(reference, method, request)
    assert got == expected, request
    return got[0]


def _chunks(total: int) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        chunk = b" " * min(64 * 1024, total - sent)
        sent += len(chunk)
        yield chunk


PLAIN_CASES: list[tuple[str, str, dict[str, Any], int]] = [
    ("a message", "POST", {"send": {"json": {"sender": "alice", "message": "hi"}}}, 200),
    ("the next one", "POST", {"send": {"json": {"sender": "alice", "message": "again", "metadata": {"a": 1}}}}, 200),
    ("a message ID", "POST", {"send": {"json": {"sender": "bob", "message": "x", "message_id": "m-1"}}}, 200),
    ("its replay", "POST", {"send": {"json": {"sender": "bob", "message": "x", "message_id": "m-1"}}}, 200),
    ("bad JSON", "POST", {"send": {"content": b'{"sender": "alice"'}}, 400),
    ("an empty body", "POST", {"send": {"content": b""}}, 400),
    ("not UTF-8", "POST", {"send": {"content": b'{"sender": "\xff"}'}}, 400),
    ("NaN", "POST", {"send": {"content": b'{"sender": "a", "message": NaN}'}}, 400),
    ("bad fields", "POST", {"send": {"json": {"sender": "", "message": 42}}}, 422),
    ("an array", "POST", {"send": {"json": [1, 2]}}, 422),
    ("a long message ID", "POST", {"send": {"json": {"sender": "c", "message": "x", "message_id": "m" * 300}}}, 422),
    (
        "a key that contradicts the body",
        "POST",
        {"send": {"json": {"sender": "c", "message": "x", "message_id": "a"}, "headers": {"Idempotency-Key": "b"}}},
        422,
    ),
    ("a bad deadline", "POST", {"send": {"json": {"sender": "c", "message": "x"}, "headers": {"X-Request-Timeout": "soon"}}}, 400),
    ("a declared oversize body", "POST", {"send": {"content": b" " * (MAX_BODY_BYTES + 1)}}, 413),
    ("a streamed oversize body", "POST", {"send": {"content": list(_chunks(MAX_BODY_BYTES + 10))}}, 413),
    ("a deadline", "POST", {"send": {"json": {"sender": "d", "message": "x"}, "headers": {"X-Request-Timeout": "5"}}}, 200),
    ("GET on the channel", "GET", {"send": {}}, 405),
    ("PUT on the channel", "PUT", {"send": {"json": {"sender": "e", "message": "x"}}}, 405),
    ("a trailing slash", "POST", {"path": WEBHOOK + "/", "send": {"json": {"sender": "e", "message": "x"}}}, 403),
]


@pytest.mark.parametrize(("name", "method", "request_", "status"), PLAIN_CASES, ids=[c[0] for c in PLAIN_CASES])
def test_the_fast_path_answers_as_the_starlette_route(
    pair: tuple[ServerProcess, ServerProcess], name: str, method: str, request_: dict[str, Any], status: int
) -> None:
    if isinstance(request_["send"].get("content"), list):  # a generator is used up by one request
        chunks = request_["send"]["content"]
        request_ = {**request_, "send": {**request_["send"], "content": iter(chunks)}}
        fast, reference = pair
        got = _answer(fast, method, request_)
        request_ = {**request_, "send": {**request_["send"], "content": iter(chunks)}}
        assert got == _answer(reference, method, request_)
        assert got[0] == status
        return
    assert _same_answers(pair, method, request_) == status


def test_both_paths_count_the_channel_alike(pair: tuple[ServerProcess, ServerProcess]) -> None:
    # Runs after the cases above (same module, same servers): the same
    # requests must have made the same series with the same counts.
    def channel_lines(server: ServerProcess) -> list[str]:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        return sorted(
            line
            for line in text.splitlines()
            if line.startswith(("convlock_http_requests_total{", "convlock_messages_total{"))
            and ("/webhooks/rest/webhook" in line or line.startswith("convlock_messages"))
        )

    fast, reference = pair
    lines = channel_lines(fast)
    assert any('status="200"' in line and "/webhooks/rest/webhook" in line for line in lines), lines
    assert lines == channel_lines(reference)


def _signed(body: bytes, secret: str = SECRET) -> dict[str, Any]:
    return {"content": body, "headers": {SIGNATURE_HEADER: sign_body(secret, body), "Content-Type": "application/json"}}


GUARDED_CASES: list[tuple[str, dict[str, Any], int]] = [
    ("no credentials", {"send": {"json": {"sender": "g", "message": "x"}}}, 401),
    ("a wrong token", {"send": {"json": {"sender": "g", "message": "x"}, "headers": {"Authorization": "Bearer no"}}}, 401),
    ("the token", {"send": {"json": {"sender": "g", "message": "x"}, "headers": {"Authorization": f"Bearer {TOKEN}"}}}, 200),
    ("the token in the query", {"path": f"{WEBHOOK}?token={TOKEN}", "send": {"json": {"sender": "g", "message": "y"}}}, 200),
    ("the token, bad JSON", {"send": {"content": b"{", "headers": {"Authorization": f"Bearer {TOKEN}"}}}, 400),
    ("a signature", {"send": _signed(b'{"sender": "h", "message": "x"}')}, 200),
    ("a wrong signature", {"send": _signed(b'{"sender": "h", "message": "x"}', "other")}, 401),
    ("a signed bad body", {"send": _signed(b'{"sender": ""}')}, 422),
    ("a signed oversize body", {"send": _signed(b" " * (MAX_BODY_BYTES + 1))}, 413),
]


@pytest.mark.parametrize(("name", "request_", "status"), GUARDED_CASES, ids=[c[0] for c in GUARDED_CASES])
def test_the_fast_path_guards_the_channel_as_the_access_middleware(
    guarded_pair: tuple[ServerProcess, ServerProcess], name: str, request_: dict[str, Any], status: int
) -> None:
    assert _same_answers(guarded_pair, "POST", request_) == status


def test_convlock_run_puts_the_fast_path_in_front_and_it_takes_only_the_channel() -> None:
    # The comparisons above would pass with the fast path switched off too:
    # this says that convlock run's app has it, and which requests it takes.
    ctx = ServerContext(InMemoryLockStore(), InMemoryTrackerStore(), demo_handler)
    assert isinstance(cast(Any, build_app(ctx)).fast_path, WebhookFastPath)
    assert cast(Any, build_app(ctx, fast_webhook=False)).fast_path is None
    base = {"type": "http", "method": "POST", "path": WEBHOOK, "root_path": ""}
    assert WebhookFastPath.serves(base)
    for other in ({"method": "GET"}, {"method": "PUT"}, {"path": WEBHOOK + "/"}, {"root_path": "/chat"},
                  {"type": "websocket"}, {"path": "/health"}):
        assert not WebhookFastPath.serves({**base, **other}), other
