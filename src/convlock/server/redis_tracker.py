"""RedisTrackerStore: conversation state in Redis, shared by every replica.

Layout: one hash per conversation, ``<key_prefix>:tracker:{<E>}``, where ``E``
is the conversation ID encoded as the lock store encodes it
(:func:`convlock.redis.keys.encode_id`: injective, brace-free),
holding ``fence``, ``ticket``, ``state`` (JSON), ``n`` (event count) and one
field ``e:<i>`` per event (JSON). The ``tracker`` segment keeps these keys
apart from the lock store's. One key per conversation means every script
touches a single hash slot, so Redis Cluster works; the braces make the
conversation the hash tag, so a conversation's tracker key lands in the same
slot as the lock store's keys for that conversation.

Tickets are the lock store's fencing tokens, which may be as large as the
Redis clock in microseconds (about 2**51): Lua compares them as doubles,
exactly, since they stay below 2**53, and they are stored as the decimal
text they arrived as.

Events are appended, not rewritten, so a save costs what the message added,
not the length of the conversation.

Each load-with-ticket and each save is ONE Lua script: the fence comparison
and the write are atomic, which is the whole point of fencing. With
``expire_after``, every load-with-ticket and save resets a TTL, so idle
conversations disappear; the fence goes with them, which is safe as long as
``expire_after`` is far longer than a lock lease (it is checked at start-up).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from redis.exceptions import RedisError

from ..config import RedisSettings
from ..ids import check_conversation_id
from ..redis.keys import encode_id
from .tracker import (
    StaleTicketError,
    TrackerRecord,
    TrackerStore,
    TrackerStoreUnavailable,
    check_ticket,
    dumps,
)

__all__ = ["RedisTrackerStore"]

# KEYS[1] the hash; ARGV[1] ticket; ARGV[2] TTL in ms (0: none).
# Returns {1, fields...} (HGETALL) or {0, fence} when the ticket is stale.
_LOAD = """
local ticket = tonumber(ARGV[1])
local raw = redis.call('HGET', KEYS[1], 'fence') or '0'
local fence = tonumber(raw)
if ticket < fence then return {0, raw} end
if ticket > fence then redis.call('HSET', KEYS[1], 'fence', ARGV[1]) end
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
local fields = redis.call('HGETALL', KEYS[1])
table.insert(fields, 1, 1)
return fields
"""

# KEYS[1] the hash; ARGV[1] ticket; ARGV[2] TTL in ms (0: none);
# ARGV[3] state JSON; ARGV[4..] new events, JSON each.
# Returns {1, event count} or {0, fence} when the ticket is stale.
_SAVE = """
local ticket = tonumber(ARGV[1])
local raw = redis.call('HGET', KEYS[1], 'fence') or '0'
if ticket < tonumber(raw) then return {0, raw} end
local n = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
for i = 4, #ARGV do
  n = n + 1
  redis.call('HSET', KEYS[1], 'e:' .. n, ARGV[i])
end
redis.call('HSET', KEYS[1], 'fence', ARGV[1], 'ticket', ARGV[1], 'state', ARGV[3], 'n', n)
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {1, n}
"""


class RedisTrackerStore(TrackerStore):
    """Fenced conversation state in Redis (standard, Sentinel or Cluster).

    Build it with :meth:`from_settings`; ``client`` is any asyncio Redis or
    RedisCluster client whose replies are bytes. ``expire_after`` (seconds)
    drops conversations idle that long; None keeps them for ever.
    """

    def __init__(
        self,
        client: Any,
        *,
        key_prefix: str = "convlock",
        expire_after: float | None = None,
        target: str = "Redis",
    ) -> None:
        self._client = client
        self._prefix = f"{key_prefix}:tracker:"
        #: Seconds after which an idle conversation is dropped, or None.
        self.expire_after = expire_after
        self._ttl_ms = 0 if expire_after is None else max(1, round(expire_after * 1000))
        self._target = target
        self._load_script = client.register_script(_LOAD)
        self._save_script = client.register_script(_SAVE)
        self._saves = 0
        self._stale = 0

    @classmethod
    def from_settings(
        cls, settings: RedisSettings, *, expire_after: float | None = None
    ) -> RedisTrackerStore:
        """Build the store from the ``tracker_store:`` block's connection keys."""
        from ..redis.connection import create_client, describe

        # retries=0: a save is not idempotent (it appends), so it is never re-sent.
        client = create_client(settings, retries=0)
        return cls(
            client, key_prefix=settings.key_prefix, expire_after=expire_after, target=describe(settings)
        )

    def key(self, conversation_id: str) -> str:
        """The Redis key of a conversation's hash."""
        return f"{self._prefix}{{{encode_id(conversation_id)}}}"

    def _unavailable(self, exc: Exception) -> TrackerStoreUnavailable:
        return TrackerStoreUnavailable(f"tracker store at {self._target} failed: {type(exc).__name__}: {exc}")

    async def load(self, conversation_id: str, *, ticket: int | None = None) -> TrackerRecord:
        check_conversation_id(conversation_id)
        key = self.key(conversation_id)
        try:
            if ticket is None:
                raw: list[Any] = await self._client.hgetall(key)
                flat: list[Any] = []
                for name, value in dict(raw).items():
                    flat += [name, value]
            else:
                check_ticket(ticket)
                reply = await self._load_script(keys=[key], args=[ticket, self._ttl_ms])
                if int(reply[0]) == 0:
                    self._stale += 1
                    raise StaleTicketError(conversation_id, ticket, int(reply[1]))
                flat = list(reply[1:])
        except RedisError as exc:
            raise self._unavailable(exc) from exc
        return self._record(conversation_id, flat)

    @staticmethod
    def _record(conversation_id: str, flat: Sequence[Any]) -> TrackerRecord:
        fields = {
            (name.decode() if isinstance(name, bytes) else str(name)): value
            for name, value in zip(flat[0::2], flat[1::2], strict=True)
        }
        count = int(fields.get("n", 0))
        events = [json.loads(fields[f"e:{i}"]) for i in range(1, count + 1)]
        state = json.loads(fields["state"]) if "state" in fields else {}
        return TrackerRecord(
            conversation_id,
            events=events,
            state=state,
            ticket=int(fields.get("ticket", 0)),
            fence=int(fields.get("fence", 0)),
        )

    async def save(
        self,
        conversation_id: str,
        *,
        ticket: int,
        new_events: Sequence[Mapping[str, Any]],
        state: Mapping[str, Any],
    ) -> TrackerRecord:
        check_conversation_id(conversation_id)
        check_ticket(ticket)
        args: list[Any] = [ticket, self._ttl_ms, dumps(dict(state))]
        args += [dumps(dict(event)) for event in new_events]
        try:
            reply = await self._save_script(keys=[self.key(conversation_id)], args=args)
        except RedisError as exc:
            raise self._unavailable(exc) from exc
        if int(reply[0]) == 0:
            self._stale += 1
            raise StaleTicketError(conversation_id, ticket, int(reply[1]))
        self._saves += 1
        return TrackerRecord(conversation_id, ticket=ticket, fence=ticket)

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except RedisError as exc:
            raise self._unavailable(exc) from exc

    async def aclose(self) -> None:
        await self._client.aclose()

    def statistics(self) -> Mapping[str, Any]:
        """Applied saves and refused stale tickets, by this process."""
        return {"backend": "redis", "saves": self._saves, "stale_refused": self._stale}

    def describe(self) -> str:
        return f"Redis tracker store at {self._target}"
