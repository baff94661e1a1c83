"""Conversation state stores ("tracker stores") with fenced saves.

A tracker store keeps, per conversation, the list of events so far, a JSON
dict of handler state, and two ticket numbers taken from the lock store:

* ``fence``: the highest ticket that has *loaded or saved* this conversation;
* ``ticket``: the ticket of the last save that was applied.

Fencing rule: a load or save carrying a ticket lower than ``fence`` is
refused with :class:`StaleTicketError`; nothing is written. Because a holder
raises the fence when it *loads* (not only when it saves), a holder whose
lease lapsed cannot overwrite the work of the holder that replaced it, even
if it saves before that holder does: the newer holder either loaded first
(the fence is already higher, the stale save is refused) or loads after the
stale save (and then sees it, so nothing is lost). Equal tickets are allowed:
that is the same holder saving.

Every value crosses the store as JSON, so a handler can never keep a
reference into stored state and change it behind the store's back.

Message IDs (exactly-once delivery): a save may carry the client's
``message_id`` and the reply that was sent for it (the JSON text of the
responses). The store remembers the last ``remember_message_ids`` IDs of each
conversation with their replies, and a fenced load that carries a
``message_id`` it remembers returns that reply in :attr:`TrackerRecord.replay`,
checked in the same step as the fence, so a repeat is never processed again.
The check happens under the conversation's lock, so a repeat that arrives
while the first is still being processed waits and then finds the ID.
Remembered IDs are scoped to one conversation and bounded in number: the
oldest is forgotten when a new one would exceed the bound (and, in Redis,
they expire with the conversation).

Bounded cost per message: a load returns the conversation's *window*, its
last ``max_event_history`` events (default 100), with the total event count
and the turn number, which are stored rather than recomputed. A message's
load and save therefore cost the same on its 3rd and its 30,000th turn.
Older events are read on demand, a page at a time (:meth:`TrackerStore.events`).
Retention: a store keeps the last ``retain_events`` events of each
conversation (default 10,000; older ones are dropped as new ones arrive, one
for one, so retention costs O(1) per event), and with ``expire_after`` (Redis)
forgets a conversation idle that long.

Custom stores written before message IDs existed keep working: the server
checks with :func:`supports_message_ids` whether a store's ``load`` and
``save`` take the new keyword arguments, and only then passes them.
"""

from __future__ import annotations

import abc
import inspect
import itertools
import json
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from .jsontext import dumps_text

__all__ = [
    "DEFAULT_MAX_EVENT_HISTORY",
    "DEFAULT_REMEMBER_MESSAGE_IDS",
    "DEFAULT_RETAIN_EVENTS",
    "EncodedState",
    "InMemoryTrackerStore",
    "JsonEvents",
    "StaleTicketError",
    "TrackerNotReplicated",
    "TrackerRecord",
    "TrackerStore",
    "TrackerStoreUnavailable",
    "check_message_id",
    "supports_message_ids",
]

#: How many of its most recent events a load returns (the handler's window) by default.
DEFAULT_MAX_EVENT_HISTORY = 100
#: How many of its most recent events each conversation keeps by default.
DEFAULT_RETAIN_EVENTS = 10_000
#: How many message IDs (with their replies) each conversation remembers by default.
DEFAULT_REMEMBER_MESSAGE_IDS = 1000
#: Longest message ID, in UTF-8 bytes.
MAX_MESSAGE_ID_BYTES = 256


class StaleTicketError(Exception):
    """A load or save carried a ticket lower than one the store already saw.

    ``ticket`` is the refused ticket and ``fence`` the higher one the store
    holds for ``conversation_id``. Nothing was written.
    """

    def __init__(self, conversation_id: str, ticket: int, fence: int) -> None:
        super().__init__(
            f"conversation {conversation_id!r}: ticket {ticket} is stale; ticket {fence} has "
            "already loaded or saved this conversation (this holder's lease lapsed or was revoked), "
            "so the save was refused and nothing was overwritten"
        )
        self.conversation_id = conversation_id
        self.ticket = ticket
        self.fence = fence


class TrackerStoreUnavailable(ConnectionError):
    """The tracker store's backend could not be reached; the message names it."""


class TrackerNotReplicated(TrackerStoreUnavailable):
    """A write reached the master but not ``min_replicas_acked`` replicas in time.

    The write may survive or may be lost in a failover; the caller must not
    acknowledge it. A retry that carries the same message ID is safe: it
    finds the ID if the write survived, and processes the message if not.
    """


def _decode(text: str | bytes) -> Any:
    # Redis gives bytes, and json.loads would first guess their encoding in
    # Python code; they are UTF-8, as we stored them.
    return json.loads(text.decode() if type(text) is bytes else text)


class JsonEvents(Sequence[dict[str, Any]]):
    """Events kept as the JSON text they are stored as, decoded one by one when read.

    A load hands the handler a window of up to ``max_event_history``
    events; most handlers read a few of them, or none, so decoding all of
    them on every message would be the largest cost of a load (profiled:
    about half of an in-memory message's time with a window of 100). Each
    read decodes a fresh dict, so a handler can never change stored events
    through what it reads.
    """

    __slots__ = ("_texts",)

    def __init__(self, texts: Sequence[str | bytes]) -> None:
        self._texts = texts

    def __len__(self) -> int:
        return len(self._texts)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> JsonEvents: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | JsonEvents:
        if isinstance(index, slice):
            return JsonEvents(self._texts[index])
        event: dict[str, Any] = _decode(self._texts[index])
        return event

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for text in self._texts:
            yield _decode(text)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"JsonEvents({len(self)} events)"


@dataclass(slots=True)
class TrackerRecord:
    """One conversation as stored: events, handler state and its tickets.

    A record of a conversation that was never saved has no events, an empty
    state and ``ticket == fence == 0`` (unless a load already raised the fence).

    ``events`` is the conversation's most recent events (the window), oldest
    first; ``event_count`` is how many events it has had in all, so the first
    event of the window is number ``event_count - len(events) + 1``, and
    ``turn`` the number of user messages stored. Stores written before these
    existed leave them None and return every event; the server then counts.
    """

    conversation_id: str
    events: Sequence[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    ticket: int = 0
    fence: int = 0
    #: The reply stored with the ``message_id`` a load asked about (JSON text),
    #: or None if the conversation does not remember that ID. When set, a store
    #: may leave ``events`` and ``state`` empty: the message is not processed.
    replay: str | None = None
    event_count: int | None = None
    turn: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form, as ``GET /conversations/{id}/tracker`` returns it."""
        return {
            "conversation_id": self.conversation_id,
            "events": list(self.events),
            "state": self.state,
            "ticket": self.ticket,
            "fence": self.fence,
            "event_count": len(self.events) if self.event_count is None else self.event_count,
        }

    def turns(self) -> int:
        """User messages stored: the stored count, or counted from ``events`` for an older store."""
        if self.turn is not None:
            return self.turn
        return sum(1 for event in self.events if event.get("event") == "user")


def check_message_id(message_id: str) -> str:
    """Return ``message_id`` if it is a ``str`` of 1 to 256 UTF-8 bytes, else raise ValueError."""
    if not isinstance(message_id, str):
        raise ValueError(f"message_id must be a string, got {type(message_id).__name__}")
    try:
        size = len(message_id.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("message_id must be valid Unicode text (no lone surrogates)") from None
    if not 1 <= size <= MAX_MESSAGE_ID_BYTES:
        raise ValueError(f"message_id must be 1 to {MAX_MESSAGE_ID_BYTES} UTF-8 bytes, got {size}")
    return message_id


def check_remember(value: int) -> int:
    """Return ``value`` if it can bound remembered message IDs (an int of 1 or more)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"remember_message_ids must be an int of 1 or more, got {value!r}")
    return value


def check_window(max_event_history: int, retain_events: int) -> int:
    """Return ``max_event_history`` if it and ``retain_events`` are valid bounds together."""
    for name, value in (("max_event_history", max_event_history), ("retain_events", retain_events)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int of 1 or more, got {value!r}")
    if max_event_history > retain_events:
        raise ValueError(
            f"max_event_history ({max_event_history}) cannot exceed retain_events ({retain_events}): "
            "a load cannot return events the store no longer keeps"
        )
    return max_event_history


def supports_message_ids(store: TrackerStore) -> bool:
    """Whether ``store``'s ``load`` takes ``message_id`` and its ``save`` takes ``message_id`` and ``reply``.

    Stores written against the older interface (without them) are still
    usable; the server then refuses messages that carry an ID instead of
    silently processing repeats.
    """

    def accepts(method: Any, names: Sequence[str]) -> bool:
        try:
            parameters = inspect.signature(method).parameters
        except (TypeError, ValueError):
            return False
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return True
        return all(name in parameters for name in names)

    return accepts(store.load, ["message_id"]) and accepts(store.save, ["message_id", "reply"])


def check_ticket(ticket: int) -> int:
    """Return ``ticket`` if it can be a fencing token (a positive int), else raise ValueError."""
    if isinstance(ticket, bool) or not isinstance(ticket, int) or ticket < 1:
        raise ValueError(f"ticket must be a positive int (a lock's fencing token), got {ticket!r}")
    return ticket


class TrackerStore(abc.ABC):
    """Where conversation state lives between messages; every write is fenced.

    Implementations keep the fencing rule of this module's docstring
    atomically: the comparison and the write are one step, so two holders can
    never both pass the check.
    """

    #: How many recent events each conversation keeps (older ones are
    #: dropped), or None when the store keeps every event. The built-in
    #: stores set it from their ``retain_events`` option.
    retain_events: int | None = None

    @abc.abstractmethod
    async def load(
        self, conversation_id: str, *, ticket: int | None = None, message_id: str | None = None
    ) -> TrackerRecord:
        """Return the conversation's record (an empty one if it was never saved).

        With ``ticket`` (a lock holder's fencing token), raise the fence to it
        in the same step, or raise :class:`StaleTicketError` if the fence is
        already higher. Without it, the load is a plain read.

        With ``message_id`` (only together with ``ticket``), check in the same
        step whether the conversation remembers that ID; if it does, the
        record's ``replay`` is the reply saved with it. The check costs O(1).
        """

    @abc.abstractmethod
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
        """Append ``new_events``, replace the state and record ``ticket``, atomically.

        Raises :class:`StaleTicketError` and writes nothing if ``ticket`` is
        lower than the fence. Values must be JSON-serializable (``TypeError``
        or ``ValueError`` otherwise, before anything is written). Returns the
        record's tickets after the save (``events`` and ``state`` may be left
        empty by stores that would have to read them back).

        With ``message_id``, remember it with ``reply`` (the JSON text sent
        to the client) in the same step, forgetting the conversation's oldest
        remembered ID if the bound is reached. Raises
        :class:`TrackerNotReplicated` when the store was asked to wait for
        replicas and they did not confirm the save in time.
        """

    async def events(self, conversation_id: str, *, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Up to ``limit`` events numbered above ``after`` (events count from 1), oldest first.

        Events dropped by retention are skipped. Reads only the page asked
        for in the built-in stores. This default, for stores written before
        paging existed, loads the record and slices it: it costs the length
        of the conversation, so such a store should override it.
        """
        record = await self.load(conversation_id)
        count = len(record.events) if record.event_count is None else record.event_count
        first = count - len(record.events) + 1
        start = max(after + 1, first)
        return list(record.events[start - first : start - first + max(0, limit)])

    async def ping(self) -> None:  # noqa: B027  (optional hook: nothing to check in memory)
        """Check that the backend answers; raise :class:`TrackerStoreUnavailable` if not."""

    async def aclose(self) -> None:  # noqa: B027  (optional hook)
        """Release the store's resources."""

    def statistics(self) -> Mapping[str, Any]:
        """Counters for metrics; keys depend on the store."""
        return {}

    def describe(self) -> str:
        """A short name of the backend for health reports and errors."""
        return type(self).__name__


def dumps(value: Any) -> str:
    """Serialize to strict JSON (no NaN), the one encoding every store uses (see :mod:`.jsontext`)."""
    return dumps_text(value)


class EncodedState(dict[str, Any]):
    """A conversation's state with its JSON ``text``, encoded once by the server before the save.

    The server encodes the state to prove it is JSON before anything is
    saved (a handler's bad value is then its own 500, with nothing written);
    the built-in stores save that text instead of encoding the state a
    second time (:func:`state_json`). To any other store it is the plain
    ``dict`` a save has always received. ``text`` must be ``dumps`` of the
    dict's items: nothing checks it.
    """

    __slots__ = ("text",)

    def __init__(self, state: Mapping[str, Any], text: str) -> None:
        super().__init__(state)
        self.text = text


def state_json(state: Mapping[str, Any]) -> str:
    """The JSON text a store saves for ``state``: the server's own for an :class:`EncodedState`."""
    if type(state) is EncodedState:
        return state.text
    return dumps(state if type(state) is dict else dict(state))


@dataclass(slots=True)
class _Stored:
    # The last retain_events events as JSON text; `count` counts every event ever
    # appended, so events[0] is number count - len(events) + 1.
    events: deque[str] = field(default_factory=deque)
    count: int = 0
    turn: int = 0
    state: str = "{}"
    ticket: int = 0
    fence: int = 0
    # message ID -> reply, oldest first, so the oldest is the one forgotten.
    replies: OrderedDict[str, str] = field(default_factory=OrderedDict)


class InMemoryTrackerStore(TrackerStore):
    """Conversation state in this process's memory: the default.

    For one server process only; replicas and workers need a shared store
    such as ``RedisTrackerStore``. State is kept as JSON text, so what a
    handler holds after a load is its own copy. Each conversation remembers
    its last ``remember_message_ids`` message IDs with their replies.
    """

    def __init__(
        self,
        *,
        remember_message_ids: int = DEFAULT_REMEMBER_MESSAGE_IDS,
        max_event_history: int = DEFAULT_MAX_EVENT_HISTORY,
        retain_events: int = DEFAULT_RETAIN_EVENTS,
    ) -> None:
        self._records: dict[str, _Stored] = {}
        #: How many recent events a load returns.
        self.max_event_history = check_window(max_event_history, retain_events)
        #: How many recent events each conversation keeps.
        self.retain_events: int = retain_events
        #: How many message IDs each conversation remembers.
        self.remember_message_ids = check_remember(remember_message_ids)
        self._saves = 0
        self._stale = 0
        self._replays = 0

    def _refuse(self, conversation_id: str, ticket: int, fence: int) -> StaleTicketError:
        self._stale += 1
        return StaleTicketError(conversation_id, ticket, fence)

    async def load(
        self, conversation_id: str, *, ticket: int | None = None, message_id: str | None = None
    ) -> TrackerRecord:
        stored = self._records.get(conversation_id)
        if message_id is not None and ticket is None:
            raise ValueError("a load with message_id must carry the lock's ticket")
        if ticket is not None:
            check_ticket(ticket)
            if stored is None:
                stored = self._records[conversation_id] = _Stored()
            if ticket < stored.fence:
                raise self._refuse(conversation_id, ticket, stored.fence)
            stored.fence = ticket
            if message_id is not None:
                reply = stored.replies.get(check_message_id(message_id))
                if reply is not None:
                    self._replays += 1
                    return TrackerRecord(
                        conversation_id, ticket=stored.ticket, fence=stored.fence, replay=reply
                    )
        if stored is None:
            return TrackerRecord(conversation_id, event_count=0, turn=0)
        window = min(self.max_event_history, len(stored.events))
        recent = list(itertools.islice(reversed(stored.events), window))
        recent.reverse()
        return TrackerRecord(
            conversation_id,
            events=JsonEvents(recent),
            state=json.loads(stored.state),
            ticket=stored.ticket,
            fence=stored.fence,
            event_count=stored.count,
            turn=stored.turn,
        )

    async def events(self, conversation_id: str, *, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        stored = self._records.get(conversation_id)
        if stored is None or limit <= 0:
            return []
        first = stored.count - len(stored.events) + 1
        start = max(after + 1, first) - first
        return [json.loads(event) for event in itertools.islice(stored.events, start, start + limit)]

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
        check_ticket(ticket)
        if message_id is not None:
            check_message_id(message_id)
        # Serialize first: a value that is not JSON must fail before any write.
        encoded_events = [dumps(event if type(event) is dict else dict(event)) for event in new_events]
        encoded_state = state_json(state)
        stored = self._records.get(conversation_id)
        if stored is None:  # (setdefault would build a _Stored, deque and all, on every save)
            stored = self._records[conversation_id] = _Stored()
        if ticket < stored.fence:
            raise self._refuse(conversation_id, ticket, stored.fence)
        stored.events.extend(encoded_events)
        stored.count += len(encoded_events)
        stored.turn += sum(1 for event in new_events if event.get("event") == "user")
        while len(stored.events) > self.retain_events:
            stored.events.popleft()
        stored.state = encoded_state
        stored.ticket = stored.fence = ticket
        if message_id is not None and message_id not in stored.replies:
            stored.replies[message_id] = "[]" if reply is None else reply
            if len(stored.replies) > self.remember_message_ids:
                stored.replies.popitem(last=False)
        self._saves += 1
        return TrackerRecord(conversation_id, ticket=ticket, fence=ticket)

    def statistics(self) -> Mapping[str, Any]:
        """Number of conversations, applied saves, refused stale tickets and replayed message IDs."""
        return {
            "backend": "in_memory",
            "conversations": len(self._records),
            "saves": self._saves,
            "stale_refused": self._stale,
            "replays": self._replays,
        }

    def describe(self) -> str:
        return "in-memory tracker store"
