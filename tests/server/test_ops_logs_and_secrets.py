"""JSON logs with lock events, and a recognisable secret absent from every output.

The canaries below are distinctive strings used as a Redis password and as
the server's auth token; each test searches for them in everything a person
or a log collector would see: log lines, error messages, ``check-config``
and ``locks`` output, ``/health`` and ``/status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_procs import start_server, write_endpoints

from convlock.cli import main
from convlock.logs import redact
from redis_procs import ACL_PASSWORD, ACL_USERNAME, RedisProcess

WEBHOOK = "/webhooks/rest/webhook"
HANDLER = "convlock_test_handlers:control"
PASSWORD_CANARY = "Canary-Pw-5f1e9d2c"
TOKEN_CANARY = "Canary-Tok-8a7b6c5d"


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(args))
    return code, out.getvalue()


def acl_block(redis: RedisProcess, password: str) -> dict[str, Any]:
    return {
        "type": "redis", "url": redis.host, "port": redis.port, "db": 0, "socket_timeout": 2,
        "username": ACL_USERNAME, "password": password,
    }


@pytest.mark.slow
async def test_json_logs_carry_conversation_and_ticket_on_every_lock_event(
    redis_server: RedisProcess, tmp_path: Path
) -> None:
    connection = {"url": redis_server.host, "port": redis_server.port, "db": 0, "socket_timeout": 2}
    endpoints = write_endpoints(tmp_path / "endpoints.yml", {
        "lock_store": {"type": "redis", "lifetime": 10, **connection},
        "tracker_store": {"type": "redis", **connection},
    })
    server = start_server(
        tmp_path, "--log-format", "json", "--log-level", "debug", "--auth-token", TOKEN_CANARY,
        endpoints=endpoints, handler=HANDLER,
    )
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            first = asyncio.create_task(http.post(WEBHOOK, json={"sender": "zoe", "message": "ctl:sleep:0.5"}))
            await asyncio.sleep(0.2)
            second = await http.post(WEBHOOK, json={"sender": "zoe", "message": "after"})
            assert (await first).status_code == 200
            assert second.status_code == 200
            # The token in a query string reaches uvicorn's access log; it must be masked there.
            forced = await http.delete("/locks/zoe", params={"token": TOKEN_CANARY})
            assert forced.status_code == 200
    finally:
        assert server.stop() == 0
    lines = [line for line in server.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= record.keys() for record in records)
    lock_events = [r for r in records if r["logger"] == "convlock.locks"]
    assert {r["event"] for r in lock_events} >= {"granted", "waiting", "released"}
    for record in lock_events:
        assert record["conversation_id"] == "zoe"
        assert isinstance(record["ticket"], int)
        assert f"ticket {record['ticket']}" in record["message"]
    woken = [r for r in lock_events if r["event"] == "granted" and "woken by the hand-off" in r["message"]]
    assert len(woken) == 1, "one debug line says the waiter was woken, and why"
    assert any("token=***" in r["message"] for r in records), "the access log line is there, masked"
    assert TOKEN_CANARY not in server.log()


@pytest.mark.slow
async def test_a_wrong_redis_password_never_shows(redis_acl: RedisProcess, tmp_path: Path) -> None:
    block = acl_block(redis_acl, PASSWORD_CANARY)
    endpoints = write_endpoints(tmp_path / "endpoints.yml", {"lock_store": block, "tracker_store": block})
    outputs: list[str] = []

    # The CLI runs its own event loop: give it a thread.
    code, out = await asyncio.to_thread(run_cli, "check-config", str(endpoints))
    assert code == 2
    assert "lock_store: Redis at 127.0.0.1" in out
    outputs.append(out)
    code, out = await asyncio.to_thread(run_cli, "check-config", str(endpoints), "--json")
    assert code == 2
    outputs.append(out)
    code, out = await asyncio.to_thread(run_cli, "locks", "ls", "--endpoints", str(endpoints))
    assert code == 2
    assert "lock store unavailable" in out
    outputs.append(out)

    server = start_server(
        tmp_path, "--log-level", "debug", "--log-format", "json", "--auth-token", TOKEN_CANARY,
        endpoints=endpoints, handler=HANDLER, wait=False,
    )
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    health = await http.get("/health")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, server.log()
                    await asyncio.sleep(0.1)
            assert health.status_code == 503
            outputs.append(health.text)
            refused = await http.post(WEBHOOK, json={"sender": "s", "message": "m"})
            assert refused.status_code == 503
            outputs.append(refused.text)
            # /status needs the token like every data route (the token itself
            # must not show in what it returns).
            assert (await http.get("/status")).status_code == 401
            status = await http.get("/status", headers={"Authorization": f"Bearer {TOKEN_CANARY}"})
            assert status.status_code == 200
            assert "unavailable" in status.text
            outputs.append(status.text)
    finally:
        server.stop()
    outputs.append(server.log())
    assert "WRONGPASS" in server.log() or "invalid username-password" in "".join(outputs)
    for text in outputs:
        assert PASSWORD_CANARY not in text
        assert TOKEN_CANARY not in text


def test_the_right_password_works_and_is_never_printed(redis_acl: RedisProcess, tmp_path: Path) -> None:
    block = acl_block(redis_acl, ACL_PASSWORD)
    endpoints = write_endpoints(tmp_path / "endpoints.yml", {"lock_store": block, "tracker_store": block})
    code, out = run_cli("check-config", str(endpoints))
    assert code == 0, out
    assert "lock scripts ok" in out
    assert ACL_PASSWORD not in out
    code, out = run_cli("locks", "ls", "--endpoints", str(endpoints), "--json")
    assert code == 0
    assert ACL_PASSWORD not in out


def test_redact_masks_secrets_url_passwords_and_token_queries() -> None:
    text = f"redis://user:{PASSWORD_CANARY}@h:1 GET /locks/x?token={TOKEN_CANARY}&a=1 and {PASSWORD_CANARY}"
    masked = redact(text, [PASSWORD_CANARY])
    assert masked == "redis://user:***@h:1 GET /locks/x?token=***&a=1 and ***"
    assert redact("a short pw: abc", ["abc"]) == "a short pw: abc", "too short to search for"
