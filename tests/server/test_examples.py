"""The shipped examples work: endpoints files parse and build stores, handlers answer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from convlock import create_lock_store, load_endpoints
from convlock.server.conversation import Conversation, Message
from convlock.server.handlers import load_handler, normalize_responses
from convlock.server.tracker_factory import create_tracker_store

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["endpoints-in-memory.yml", "endpoints-redis.yml", "endpoints-replicas.yml"])
async def test_example_endpoints_build_both_stores(name: str) -> None:
    config = load_endpoints(ROOT / "examples" / name)
    lock_store = create_lock_store(config["lock_store"])
    tracker_store = create_tracker_store(config["tracker_store"])
    await lock_store.aclose()  # built, never connected
    await tracker_store.aclose()


async def test_the_counter_example_keeps_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    sys.modules.pop("examples.handlers", None)
    counter = load_handler("examples.handlers:counter")
    state: dict[str, object] = {}
    first = await counter(Message("u", "hi, my name is Ada"), Conversation("u", (), state, 1, 1))
    second = await counter(Message("u", "how many?"), Conversation("u", (), state, 2, 2))
    assert normalize_responses(first, "u")[1] == {"recipient_id": "u", "text": "Ask me 'how many?'",
                                                  "buttons": ["how many?"]}
    assert second == "Ada sent 2 messages so far (this is turn 2)."
    assert state == {"count": 2, "name": "Ada"}
