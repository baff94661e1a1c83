"""Three ``convlock run`` replicas sharing one Redis: no lost update, no reordering, survival of a kill.

Every message goes to a randomly chosen replica. The demo handler answers
``#<turn>: <text>``, where the turn comes from the stored conversation, so a
lost update shows as a repeated turn and a reordering as texts out of order.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_procs import ServerProcess, all_events, start_server, write_endpoints

from redis_procs import RedisProcess

pytestmark = pytest.mark.slow

WEBHOOK = "/webhooks/rest/webhook"
CONVERSATIONS = 20
MESSAGES = 30


def replica_endpoints(path: Path, redis: RedisProcess, prefix: str, lifetime: float) -> Path:
    connection = {"url": redis.host, "port": redis.port, "db": 0, "key_prefix": prefix}
    return write_endpoints(path / f"{prefix}.yml", {
        "lock_store": {"type": "redis", "lifetime": lifetime, **connection},
        "tracker_store": {"type": "redis", **connection},
    })


def start_replicas(log_dir: Path, config: Path, count: int = 3) -> list[ServerProcess]:
    servers = [start_server(log_dir, endpoints=config, wait=False) for _ in range(count)]
    try:
        for server in servers:
            server.wait_ready()
    except BaseException:
        for server in servers:
            server.kill()
        raise
    return servers


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, redis_server_session: RedisProcess) -> Iterator[list[ServerProcess]]:
    log_dir = tmp_path_factory.mktemp("replicas")
    servers = start_replicas(log_dir, replica_endpoints(log_dir, redis_server_session, "replicas", lifetime=10))
    yield servers
    assert [server.stop() for server in servers] == [0, 0, 0], "\n".join(s.log() for s in servers)


async def fetch_tracker(http: httpx.AsyncClient, base: str, sender: str) -> list[dict[str, Any]]:
    return await all_events(f"{base}/conversations/{sender}/tracker")


def check_conversation(events: list[dict[str, Any]], expected: list[str]) -> list[str]:
    """Assert each expected text is stored exactly once with turns 1..N; return the stored order."""
    users = [event for event in events if event["event"] == "user"]
    bots = [event for event in events if event["event"] == "bot"]
    texts = [event["text"] for event in users]
    assert Counter(texts) == Counter(expected), "every message exactly once"
    assert [event["turn"] for event in users] == list(range(1, len(expected) + 1)), "turns 1..N, no gap or repeat"
    assert [event["text"] for event in bots] == [f"#{event['turn']}: {event['text']}" for event in users]
    tickets = [event["ticket"] for event in users]
    assert tickets == sorted(set(tickets)), "tickets strictly increase"
    return texts


async def test_sequential_clients_keep_every_message_in_order(replicas: list[ServerProcess]) -> None:
    rng = random.Random(1)
    urls = [server.url for server in replicas]
    used: Counter[str] = Counter()
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as http:

        async def client(sender: str) -> list[str]:
            sent = []
            for i in range(MESSAGES):
                base = rng.choice(urls)
                used[base] += 1
                text = f"{sender}/m{i}"
                response = await http.post(f"{base}{WEBHOOK}", json={"sender": sender, "message": text})
                assert response.status_code == 200, response.text
                assert response.json() == [{"recipient_id": sender, "text": f"#{i + 1}: {text}"}]
                sent.append(text)
            return sent

        senders = [f"seq-{n}" for n in range(CONVERSATIONS)]
        sent = await asyncio.gather(*(client(sender) for sender in senders))
        for sender, expected in zip(senders, sent, strict=True):
            events = await fetch_tracker(http, rng.choice(urls), sender)
            assert check_conversation(events, expected) == expected, "send order kept"
    assert all(used[url] > 100 for url in urls), used


async def test_concurrent_senders_lose_nothing(replicas: list[ServerProcess]) -> None:
    rng = random.Random(2)
    urls = [server.url for server in replicas]
    senders_per_conversation = 3
    per_sender = MESSAGES // senders_per_conversation
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as http:

        async def sender_task(conversation: str, who: int) -> list[tuple[str, int]]:
            answers = []
            for i in range(per_sender):
                text = f"{conversation}/s{who}/m{i}"
                response = await http.post(f"{rng.choice(urls)}{WEBHOOK}", json={"sender": conversation, "message": text})
                assert response.status_code == 200, response.text
                reply = response.json()[0]["text"]
                turn, _, echoed = reply.partition(": ")
                assert echoed == text
                answers.append((text, int(turn.lstrip("#"))))
            return answers

        conversations = [f"conc-{n}" for n in range(CONVERSATIONS)]
        results = await asyncio.gather(*(
            sender_task(conversation, who) for conversation in conversations for who in range(senders_per_conversation)
        ))
        by_conversation: dict[str, list[list[tuple[str, int]]]] = {c: [] for c in conversations}
        for index, answers in enumerate(results):
            by_conversation[conversations[index // senders_per_conversation]].append(answers)
        for conversation, answer_lists in by_conversation.items():
            events = await fetch_tracker(http, rng.choice(urls), conversation)
            expected = [text for answers in answer_lists for text, _ in answers]
            stored = check_conversation(events, expected)
            position = {text: turn for turn, text in enumerate(stored, 1)}
            for answers in answer_lists:
                # Each sender waited for each answer, so its messages are stored in its send order,
                # and the turn it was told is the turn that was stored.
                assert [position[text] for text, _ in answers] == sorted(position[text] for text, _ in answers)
                assert all(position[text] == turn for text, turn in answers)


async def test_a_killed_replica_blocks_its_conversations_only_until_the_lease_ends(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    servers = start_replicas(tmp_path, replica_endpoints(tmp_path, redis_server, "kill", lifetime=2))
    victim, survivors = servers[0], servers[1:]
    rng = random.Random(3)
    done = 0
    half = CONVERSATIONS * MESSAGES // 2
    killed = asyncio.Event()
    failed_on_victim: list[str] = []
    after_kill_ok: Counter[str] = Counter()
    try:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as http:

            async def client(sender: str) -> list[str]:
                nonlocal done
                sent = []
                for i in range(MESSAGES):
                    text = f"{sender}/m{i}"
                    pool = survivors if killed.is_set() else servers
                    server = rng.choice(pool)
                    try:
                        response = await http.post(f"{server.url}{WEBHOOK}", json={"sender": sender, "message": text})
                    except httpx.TransportError:
                        assert server is victim, f"a surviving replica failed: {server.url}"
                        await killed.wait()
                        failed_on_victim.append(text)
                        # The victim is dead and reaped: it can write nothing more. If it saved
                        # the message before dying, the message is done; otherwise send it again.
                        events = await fetch_tracker(http, survivors[0].url, sender)
                        if text not in [e["text"] for e in events if e["event"] == "user"]:
                            response = await http.post(
                                f"{survivors[0].url}{WEBHOOK}", json={"sender": sender, "message": text}
                            )
                            assert response.status_code == 200, response.text
                    else:
                        assert response.status_code == 200, response.text
                        if killed.is_set() and server is not victim:
                            after_kill_ok[server.url] += 1
                    sent.append(text)
                    done += 1
                    if done == half and not killed.is_set():
                        victim.kill()
                        killed.set()
                return sent

            senders = [f"kill-{n}" for n in range(CONVERSATIONS)]
            sent = await asyncio.gather(*(client(sender) for sender in senders))
            for sender, expected in zip(senders, sent, strict=True):
                events = await fetch_tracker(http, survivors[1].url, sender)
                assert check_conversation(events, expected) == expected
    finally:
        for server in servers:
            server.stop()
    assert killed.is_set()
    assert failed_on_victim, "some requests were in flight on the killed replica"
    assert all(after_kill_ok[s.url] > 50 for s in survivors), after_kill_ok
    # The dead replica's tickets lapse with their leases: no lock keys stay behind.
    for _ in range(100):
        if not [k for k in redis_server.command("KEYS", "kill:*") if not k.startswith("kill:tracker:")]:
            break
        await asyncio.sleep(0.1)
    assert [k for k in redis_server.command("KEYS", "kill:*") if not k.startswith("kill:tracker:")] == []
