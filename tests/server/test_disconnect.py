"""``client_disconnected`` on a real uvicorn, with each of its HTTP implementations, over real sockets.

The channel asks once per message whether the client has gone. Under
uvicorn it reads the request cycle's own flags instead of stepping
``receive()`` (see :mod:`convlock.server.disconnect`); these tests check that
uvicorn's cycles are the kind it reads (so the cheap branch is the one
``convlock run`` takes), and that the answer is right both ways: False while
the client waits for its answer, True once it has hung up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn

from convlock.server.disconnect import client_disconnected, reads_server_flags
from convlock.verify.spawn import free_port

pytestmark = pytest.mark.timeout(60)


class _Recorder:
    """An ASGI app that reads the body, then reports what ``client_disconnected`` says, as it says it."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool]] = []  # (reads_server_flags, client_disconnected)
        self.hung_up = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        wait_for_hang_up = json.loads(body).get("hang_up", False)
        gone = await client_disconnected(receive)
        if wait_for_hang_up:
            # The client closes its socket after sending; poll until uvicorn has seen it.
            for _ in range(500):
                if gone:
                    break
                await asyncio.sleep(0.01)
                gone = await client_disconnected(receive)
            self.seen.append((reads_server_flags(receive), gone))
            self.hung_up.set()
            return
        self.seen.append((reads_server_flags(receive), gone))
        payload = json.dumps({"gone": gone}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})


@contextlib.asynccontextmanager
async def _serving(app: _Recorder, http: str) -> AsyncIterator[int]:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=http, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.01)
        assert server.started, "uvicorn did not start"
        yield port
    finally:
        server.should_exit = True
        await task


async def _post(port: int, payload: dict[str, Any], *, hang_up: bool) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps(payload).encode()
    writer.write(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    if hang_up:
        writer.close()
        await writer.wait_closed()
        return b""
    answer = await reader.read(65536)
    writer.close()
    await writer.wait_closed()
    return answer


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_uvicorn_cycles_are_read_by_their_flags_and_answer_both_ways(http: str) -> None:
    pytest.importorskip(http)
    app = _Recorder()
    async with _serving(app, http) as port:
        answer = await _post(port, {"hang_up": False}, hang_up=False)
        assert b'{"gone":false}' in answer.replace(b" ", b"")
        await _post(port, {"hang_up": True}, hang_up=True)
        await asyncio.wait_for(app.hung_up.wait(), 10)
    assert app.seen == [(True, False), (True, True)], (
        f"uvicorn's {http} cycle: (read by its flags, client gone) per request"
    )


async def test_a_receive_without_flags_is_stepped_and_still_answers() -> None:
    messages = [{"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    assert not reads_server_flags(receive)
    assert await client_disconnected(receive) is True
    assert await client_disconnected(receive) is False, "nothing more arrived: it would wait"
