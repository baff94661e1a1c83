"""A flood on one conversation through ``convlock run`` on Redis: others unaffected, no 5xx, 429 past the bound."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_procs import all_events, start_server, write_endpoints

from redis_procs import RedisProcess

WEBHOOK = "/webhooks/rest/webhook"
#: Messages sent at once on the hot conversation: three times the bound of 50 waiting.
HOT = 150


@pytest.mark.slow
async def test_a_flooding_sender_gets_429_past_the_bound_and_other_senders_are_served(
    fresh_redis: RedisProcess, tmp_path: Path
) -> None:
    connection: dict[str, Any] = {"url": fresh_redis.host, "port": fresh_redis.port, "db": 0}
    endpoints = write_endpoints(
        tmp_path / "endpoints.yml",
        {
            "lock_store": {"type": "redis", "lifetime": 10, **connection},
            "tracker_store": {"type": "redis", **connection},
        },
    )
    server = start_server(tmp_path, "--max-waiting-per-conversation", "50", endpoints=endpoints)
    try:
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:

            async def send(sender: str, text: str) -> httpx.Response:
                return await http.post(WEBHOOK, json={"sender": sender, "message": text})

            hot = [send("hot", f"m{i}") for i in range(HOT)]
            others = [send(f"other{i}", "hello") for i in range(20)]
            replies = await asyncio.gather(*hot, *others)
            hot_replies, other_replies = replies[:HOT], replies[HOT:]

            assert [r.status_code for r in other_replies] == [200] * 20, [r.text for r in other_replies]
            statuses = {r.status_code for r in hot_replies}
            assert statuses <= {200, 429}, [r.text for r in hot_replies if r.status_code not in (200, 429)][:3]
            assert 429 in statuses, f"{HOT} at once is past a bound of 50 waiting"
            refused = [r for r in hot_replies if r.status_code == 429]
            assert all(r.headers.get("retry-after") == "1" for r in refused)
            assert "max-waiting-per-conversation" in refused[0].json()["reason"]

            # Every acknowledged message is stored exactly once, with the
            # turn its reply named, and turns follow on without a gap.
            acked: dict[str, int] = {}
            for i, reply in enumerate(hot_replies):
                if reply.status_code == 200:
                    match = re.fullmatch(r"#(\d+): (m\d+)", reply.json()[0]["text"])
                    assert match is not None
                    assert match.group(2) == f"m{i}"
                    acked[match.group(2)] = int(match.group(1))
            events = await all_events(f"{server.url}/conversations/hot/tracker")
            users = [e for e in events if e["event"] == "user"]
            assert [e["turn"] for e in users] == list(range(1, len(users) + 1))
            assert {e["text"]: e["turn"] for e in users} == acked
            assert len(users) == len(acked)

            # A new connection: the burst's pooled ones may have been closed
            # by the server's keep-alive timeout meanwhile.
            async with httpx.AsyncClient(timeout=30) as fresh:
                metrics = (await fresh.get(f"{server.url}/metrics")).text
            overloaded = re.search(r'convlock_messages_total\{outcome="overloaded"\} (\d+)', metrics)
            assert overloaded is not None
            assert int(float(overloaded.group(1))) == len(refused)
    finally:
        server.stop()
