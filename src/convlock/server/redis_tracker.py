"""RedisTrackerStore: conversation state in Redis, shared by every replica.

Layout: one hash per conversation, ``<key_prefix>:tracker:{<E>}``, where ``E``
is the conversation ID encoded as the lock store encodes it
(:func:`convlock.redis.keys.encode_id`: injective, brace-free),
holding ``fence``, ``ticket``, ``state`` (JSON) and ``n`` (event count), and
beside it a list ``...:ev`` of its events (JSON), newest last (the full
layout, with the fields older versions kept events in, is in
:mod:`.redis_tracker_scripts`). The ``tracker`` segment keeps these keys
apart from the lock store's. Every key of a conversation carries the braces,
which make the conversation the hash tag: every script touches a single
hash slot, so Redis Cluster works, and it is the slot of the lock store's
keys for that conversation.

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

Message IDs: two more keys per conversation, in the same slot, remember the
last ``remember_message_ids`` IDs with their replies (layout and scripts in
:mod:`convlock.server.redis_tracker_scripts`). The load script checks the ID
after the fence, so a repeat costs no extra round trip.

Replicas (``min_replicas_acked`` > 0): Redis replicates asynchronously, so a
save the master acknowledged can be lost in a failover. The save is
therefore sent in one pipeline with ``WAIT min_replicas_acked timeout`` on
the same connection (WAIT counts the replicas that have this connection's
writes); fewer acknowledgements raise :class:`TrackerNotReplicated`, so the
server answers 503 and never acknowledges a save that a failover could drop.
A replay is confirmed the same way (``CONFIRM`` + ``WAIT``), because the
remembered ID it read may itself be a save that was never acknowledged.
This bounds what a *planned* failover can lose to nothing; a crash can still
lose what the master acknowledged and the chosen replica had not received
when WAIT was not used (see ``docs/redis.md``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError

from ..config import RedisSettings
from ..ids import check_conversation_id
from ..redis.keys import encode_id
from . import redis_tracker_scripts as lua
from .tracker import (
    DEFAULT_MAX_EVENT_HISTORY,
    DEFAULT_REMEMBER_MESSAGE_IDS,
    DEFAULT_RETAIN_EVENTS,
    JsonEvents,
    StaleTicketError,
    TrackerNotReplicated,
    TrackerRecord,
    TrackerStore,
    TrackerStoreUnavailable,
    check_message_id,
    check_remember,
    check_ticket,
    check_window,
    dumps,
    state_json,
)

__all__ = ["PAGE_LIMIT", "RedisTrackerStore"]

#: The most events one page (and one load's window) may hold: a script names
#: each field of a conversation stored in the earlier layout (one field per
#: event), and Lua's stack limits how many it can pass at once.
PAGE_LIMIT = 1000


class RedisTrackerStore(TrackerStore):
    """Fenced conversation state in Redis (standard, Sentinel or Cluster).

    Build it with :meth:`from_settings`; ``client`` is any asyncio Redis or
    RedisCluster client whose replies are bytes. ``expire_after`` (seconds)
    drops conversations idle that long; None keeps them for ever.
    ``remember_message_ids`` bounds the message IDs each conversation
    remembers. With ``min_replicas_acked`` > 0, a save (and a replay) only
    succeeds once that many replicas confirmed it within
    ``replica_ack_timeout`` seconds; otherwise it raises
    :class:`TrackerNotReplicated`.
    """

    def __init__(
        self,
        client: Any,
        *,
        key_prefix: str = "convlock",
        expire_after: float | None = None,
        target: str = "Redis",
        remember_message_ids: int = DEFAULT_REMEMBER_MESSAGE_IDS,
        min_replicas_acked: int = 0,
        replica_ack_timeout: float = 1.0,
        max_event_history: int = DEFAULT_MAX_EVENT_HISTORY,
        retain_events: int = DEFAULT_RETAIN_EVENTS,
    ) -> None:
        self._client = client
        #: The connection settings it was built from (None for a client passed
        #: in): the server uses them to tell whether its lock store is on the
        #: same Redis, where both can share scripts (see .redis_message_path).
        self.settings: RedisSettings | None = None
        #: How many recent events a load returns; how many each conversation keeps.
        self.max_event_history = check_window(max_event_history, retain_events)
        self.retain_events: int = retain_events
        self._prefix = f"{key_prefix}:tracker:"
        #: Seconds after which an idle conversation is dropped, or None.
        self.expire_after = expire_after
        self._ttl_ms = 0 if expire_after is None else max(1, round(expire_after * 1000))
        self._target = target
        #: How many message IDs each conversation remembers.
        self.remember_message_ids = check_remember(remember_message_ids)
        if type(min_replicas_acked) is not int or min_replicas_acked < 0:
            raise ValueError(f"min_replicas_acked must be an int of 0 or more, got {min_replicas_acked!r}")
        if not replica_ack_timeout > 0:
            raise ValueError(f"replica_ack_timeout must be positive, got {replica_ack_timeout!r}")
        #: Replicas that must confirm each save before it is acknowledged (0: none).
        self.min_replicas_acked = min_replicas_acked
        self._wait_ms = max(1, round(replica_ack_timeout * 1000))
        self._load_script = client.register_script(lua.LOAD)
        self._save_script = client.register_script(lua.SAVE)
        self._confirm_script = client.register_script(lua.CONFIRM)
        self._peek_script = client.register_script(lua.PEEK)
        self._events_script = client.register_script(lua.EVENTS)
        self._saves = 0
        self._stale = 0
        self._replays = 0
        self._not_replicated = 0

    @classmethod
    def from_settings(
        cls,
        settings: RedisSettings,
        *,
        expire_after: float | None = None,
        remember_message_ids: int = DEFAULT_REMEMBER_MESSAGE_IDS,
        min_replicas_acked: int | None = None,
        replica_ack_timeout: float = 1.0,
        max_event_history: int = DEFAULT_MAX_EVENT_HISTORY,
        retain_events: int = DEFAULT_RETAIN_EVENTS,
    ) -> RedisTrackerStore:
        """Build the store from the ``tracker_store:`` block's connection keys.

        ``min_replicas_acked`` None means 1 in Sentinel mode (a failover must
        not lose an acknowledged save) and 0 otherwise.
        """
        from ..redis.connection import create_client, describe

        if min_replicas_acked is None:
            min_replicas_acked = 1 if settings.deployment_mode == "sentinel" else 0
        # retries=0: a save is not idempotent (it appends), so it is never re-sent.
        client = create_client(settings, retries=0)
        store = cls(
            client,
            key_prefix=settings.key_prefix,
            expire_after=expire_after,
            target=describe(settings),
            remember_message_ids=remember_message_ids,
            min_replicas_acked=min_replicas_acked,
            replica_ack_timeout=replica_ack_timeout,
            max_event_history=max_event_history,
            retain_events=retain_events,
        )
        store.settings = settings
        return store

    def key(self, conversation_id: str) -> str:
        """The Redis key of a conversation's hash."""
        return f"{self._prefix}{{{encode_id(conversation_id)}}}"

    def keys(self, conversation_id: str) -> list[str]:
        """The conversation's keys: its hash, its events, its remembered message IDs and their order."""
        record = self.key(conversation_id)
        return [record, f"{record}:ev", f"{record}:ids", f"{record}:ido"]

    async def _replicated(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run ``script``, then ``WAIT`` on the same connection; raise if too few replicas confirm.

        Both go in one pipeline, which redis-py sends on one connection (for
        a cluster: on one connection to the node that owns the keys), so
        WAIT counts exactly the replicas that have this script's writes.
        """
        client = self._client
        extra: dict[str, Any] = {}
        if isinstance(client, RedisCluster):
            await client.initialize()  # learns the slot map on first use; a no-op after that
            extra["target_nodes"] = client.get_node_from_key(keys[0])
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", self.min_replicas_acked, self._wait_ms, **extra)
            reply, acked = await pipe.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError) and attempt == 0:
                await client.script_load(script.script)
                continue
            break
        if isinstance(reply, Exception):
            raise reply
        if isinstance(acked, Exception):
            raise acked
        refused = isinstance(reply, list) and int(reply[0]) == 0  # a stale ticket wrote nothing
        if not refused and int(acked) < self.min_replicas_acked:
            self._not_replicated += 1
            raise TrackerNotReplicated(
                f"tracker store at {self._target}: the write reached the master but only {int(acked)} of "
                f"the {self.min_replicas_acked} replicas required (min_replicas_acked) confirmed it within "
                f"{self._wait_ms} ms, so it is not acknowledged; retry the message with its message_id"
            )
        return reply

    def _unavailable(self, exc: Exception) -> TrackerStoreUnavailable:
        return TrackerStoreUnavailable(f"tracker store at {self._target} failed: {type(exc).__name__}: {exc}")

    async def load(
        self, conversation_id: str, *, ticket: int | None = None, message_id: str | None = None
    ) -> TrackerRecord:
        check_conversation_id(conversation_id)
        if message_id is not None:
            if ticket is None:
                raise ValueError("a load with message_id must carry the lock's ticket")
            check_message_id(message_id)
        keys = self.keys(conversation_id)
        try:
            if ticket is None:
                reply = await self._peek_script(keys=keys[:2], args=[self.max_event_history])
            else:
                check_ticket(ticket)
                reply = await self._load_script(keys=keys, args=[ticket, *self.load_args(message_id)])
                return await self.loaded(conversation_id, reply, ticket=ticket, message_id=message_id)
            return await self._counted(self._record(conversation_id, reply))
        except RedisError as exc:
            raise self._unavailable(exc) from exc

    def load_args(self, message_id: str | None) -> list[Any]:
        """A fenced load's arguments after the ticket: TTL, message ID ('' for none), window."""
        if message_id is not None:
            check_message_id(message_id)
        return [self._ttl_ms, message_id or "", self.max_event_history]

    async def loaded(
        self, conversation_id: str, reply: Sequence[Any], *, ticket: int, message_id: str | None
    ) -> TrackerRecord:
        """The record a fenced load's reply describes (``LOAD``'s, or the combined path's).

        Raises :class:`StaleTicketError` for a refused ticket; a remembered
        message ID gives a record carrying its replay.
        """
        if int(reply[0]) == 0:
            self._stale += 1
            raise StaleTicketError(conversation_id, ticket, int(reply[1]))
        if int(reply[0]) == 2:
            assert message_id is not None
            keys = self.keys(conversation_id)
            return await self._replay(conversation_id, keys, message_id, ticket, reply[1])
        return await self._counted(self._record(conversation_id, reply))

    async def _counted(self, record: TrackerRecord) -> TrackerRecord:
        if record.turn is None and record.event_count:
            # Saved before turns were stored: count once (the next save
            # keeps counting from the stored 'u' only for new conversations).
            record.turn, after = 0, 0
            while page := await self.events(record.conversation_id, after=after, limit=PAGE_LIMIT):
                record.turn += sum(1 for event in page if event.get("event") == "user")
                after += len(page)
        return record

    async def _replay(
        self, conversation_id: str, keys: list[str], message_id: str, ticket: int, stored: Any
    ) -> TrackerRecord:
        """The record of a remembered message ID, once enough replicas hold it."""
        # The ID may come from a save that was answered 503 (not replicated
        # in time): replay it only once replicas have it.
        if self.min_replicas_acked and not await self._replicated(
            self._confirm_script, [keys[0], keys[2]], [message_id]
        ):
                raise TrackerStoreUnavailable(
                    f"tracker store at {self._target}: message ID {message_id!r} vanished while its "
                    "reply was being confirmed (the conversation expired); retry the message"
                )
        self._replays += 1
        reply = stored.decode("utf-8") if isinstance(stored, bytes) else str(stored)
        return TrackerRecord(conversation_id, ticket=ticket, fence=ticket, replay=reply)

    @staticmethod
    def _record(conversation_id: str, reply: Sequence[Any]) -> TrackerRecord:
        """A record from a load's reply ``{1, fence, ticket, state, n, u, {events...}}``."""
        _, fence, ticket, state, count, turn, events = reply
        return TrackerRecord(
            conversation_id,
            events=JsonEvents([event for event in events if event]),
            # bytes from Redis: json.loads would first guess their encoding (in Python)
            state=json.loads(state.decode() if type(state) is bytes else state) if state else {},
            ticket=int(ticket),
            fence=int(fence),
            event_count=int(count),
            turn=int(turn) if turn else (0 if not int(count) else None),
        )

    async def events(self, conversation_id: str, *, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """One page of events, read in one script whatever the conversation's length."""
        check_conversation_id(conversation_id)
        if limit <= 0:
            return []
        limit = min(limit, PAGE_LIMIT)
        try:
            reply = await self._events_script(
                keys=self.keys(conversation_id)[:2], args=[max(0, after), limit, self.retain_events]
            )
        except RedisError as exc:
            raise self._unavailable(exc) from exc
        return [json.loads(event) for event in reply[1:]]

    async def save(
        self,
        conversation_id: str,
        *,
        ticket: int,
        new_events: Sequence[Mapping[str, Any]],
        state: Mapping[str, Any],
        message_id: str | None = None,
        reply: str | None = None,
    ) -> TrackerRecord:
        check_conversation_id(conversation_id)
        check_ticket(ticket)
        args = [ticket, *self.save_args(new_events, state, message_id, reply)]
        keys = self.keys(conversation_id)
        try:
            if self.min_replicas_acked:
                result = await self._replicated(self._save_script, keys, args)
            else:
                result = await self._save_script(keys=keys, args=args)
        except RedisError as exc:
            raise self._unavailable(exc) from exc
        self.saved(conversation_id, result, ticket=ticket)
        return TrackerRecord(conversation_id, ticket=ticket, fence=ticket)

    def save_args(
        self,
        new_events: Sequence[Mapping[str, Any]],
        state: Mapping[str, Any],
        message_id: str | None,
        reply: str | None,
    ) -> list[Any]:
        """A save's arguments after the ticket: TTL, state, message ID and reply, bounds, events."""
        if message_id is not None:
            check_message_id(message_id)
        args: list[Any] = [self._ttl_ms, state_json(state)]
        args += [message_id or "", "[]" if reply is None else reply, self.remember_message_ids]
        args += [sum(1 for event in new_events if event.get("event") == "user"), self.retain_events]
        args += [dumps(dict(event)) for event in new_events]
        return args

    def saved(self, conversation_id: str, result: Sequence[Any], *, ticket: int) -> None:
        """Check a save's reply (``SAVE``'s, or the combined path's); raise if the ticket was stale."""
        if int(result[0]) == 0:
            self._stale += 1
            raise StaleTicketError(conversation_id, ticket, int(result[1]))
        self._saves += 1

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except RedisError as exc:
            raise self._unavailable(exc) from exc

    async def aclose(self) -> None:
        await self._client.aclose()

    def statistics(self) -> Mapping[str, Any]:
        """Applied saves, refused stale tickets, replays and unconfirmed saves, by this process."""
        return {
            "backend": "redis",
            "saves": self._saves,
            "stale_refused": self._stale,
            "replays": self._replays,
            "not_replicated": self._not_replicated,
            "min_replicas_acked": self.min_replicas_acked,
        }

    def describe(self) -> str:
        return f"Redis tracker store at {self._target}"
