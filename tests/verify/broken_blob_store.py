"""A deliberately broken lock store, for verify to catch: never ship anything like it.

It does what the spec's framework does with Redis: each conversation's lock is
one JSON blob (its tickets and their wall-clock expiry times) that every
operation reads with GET, changes in Python and writes back with SET, and a
waiter polls the blob until its ticket is first. Nothing is atomic, so two
processes that draw at once both get the same ticket and both think it is
their turn; a release can overwrite a draw made in between; and ticket
numbers restart at 0 whenever the blob is deleted.

Loaded by dotted path from a ``lock_store:`` block (``type:
broken_blob_store.BlobLockStore``), built with the block's other keys.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis

from convlock import HeldLock, LockSnapshot, LockStore, LockTimeoutError


class _BlobHold(HeldLock):
    def __init__(
        self, store: BlobLockStore, conversation_id: str, lifetime: float, wait_timeout: float | None
    ) -> None:
        self._store = store
        self.conversation_id = conversation_id
        self._lifetime = lifetime
        self._wait_timeout = wait_timeout
        self._number = -1

    @property
    def ticket(self) -> int:
        return self._number

    @property
    def lost(self) -> bool:
        return False  # the spec's framework has no way to know

    async def ensure(self) -> None:
        return None

    async def __aenter__(self) -> _BlobHold:
        store = self._store
        tickets = await store._load(self.conversation_id)
        self._number = tickets[-1]["number"] + 1 if tickets else 0
        tickets.append({"number": self._number, "expires": time.time() + self._lifetime})
        await store._save(self.conversation_id, tickets)
        started = time.monotonic()
        while True:
            live = [t for t in await store._load(self.conversation_id) if t["expires"] > time.time()]
            if not live or live[0]["number"] == self._number:
                return self
            if self._wait_timeout is not None and time.monotonic() - started > self._wait_timeout:
                raise LockTimeoutError("gave up waiting", conversation_id=self.conversation_id)
            await asyncio.sleep(store.poll)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        store = self._store
        tickets = [t for t in await store._load(self.conversation_id) if t["number"] != self._number]
        await store._save(self.conversation_id, tickets)


class BlobLockStore(LockStore):
    """GET/SET of a JSON blob per conversation, polled: races everywhere (see the module docstring)."""

    def __init__(
        self,
        *,
        url: str = "localhost",
        port: int = 6379,
        db: int = 0,
        key_prefix: str = "blob",
        poll: float = 0.02,
        lifetime: float | None = None,
        wait_timeout: float | None = None,
    ) -> None:
        super().__init__(lifetime=lifetime, wait_timeout=wait_timeout)
        self._client = aioredis.Redis(host=url, port=int(port), db=int(db), socket_timeout=5)
        self._prefix = key_prefix
        self.poll = float(poll)

    def _key(self, conversation_id: str) -> str:
        return f"{self._prefix}:{conversation_id}"

    async def _load(self, conversation_id: str) -> list[dict[str, Any]]:
        raw = await self._client.get(self._key(conversation_id))
        tickets: list[dict[str, Any]] = json.loads(raw)["tickets"] if raw else []
        return tickets

    async def _save(self, conversation_id: str, tickets: list[dict[str, Any]]) -> None:
        if tickets:
            blob = json.dumps({"conversation_id": conversation_id, "tickets": tickets})
            await self._client.set(self._key(conversation_id), blob)
        else:
            await self._client.delete(self._key(conversation_id))

    def lock(
        self,
        conversation_id: str,
        *,
        lifetime: float | None = None,
        wait_timeout: float | None = None,
        renew: bool = True,
    ) -> _BlobHold:
        return _BlobHold(self, conversation_id, lifetime or self.lifetime, wait_timeout or self.wait_timeout)

    async def inspect(self, conversation_id: str) -> LockSnapshot | None:
        return None

    async def conversations(self) -> AsyncIterator[str]:
        async for key in self._client.scan_iter(match=f"{self._prefix}:*"):
            yield key.decode()[len(self._prefix) + 1 :]

    async def force_release(self, conversation_id: str) -> int | None:
        return None

    async def ping(self) -> None:
        await self._client.ping()

    async def aclose(self) -> None:
        await self._client.aclose()
