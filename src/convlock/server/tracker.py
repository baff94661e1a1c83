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
"""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "InMemoryTrackerStore",
    "StaleTicketError",
    "TrackerRecord",
    "TrackerStore",
    "TrackerStoreUnavailable",
]


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


@dataclass(slots=True)
class TrackerRecord:
    """One conversation as stored: events, handler state and its tickets.

    A record of a conversation that was never saved has no events, an empty
    state and ``ticket == fence == 0`` (unless a load already raised the fence).
    """

    conversation_id: str
    events: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    ticket: int = 0
    fence: int = 0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form, as ``GET /conversations/{id}/tracker`` returns it."""
        return {
            "conversation_id": self.conversation_id,
            "events": self.events,
            "state": self.state,
            "ticket": self.ticket,
            "fence": self.fence,
        }


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

    @abc.abstractmethod
    async def load(self, conversation_id: str, *, ticket: int | None = None) -> TrackerRecord:
        """Return the conversation's record (an empty one if it was never saved).

        With ``ticket`` (a lock holder's fencing token), raise the fence to it
        in the same step, or raise :class:`StaleTicketError` if the fence is
        already higher. Without it, the load is a plain read.
        """

    @abc.abstractmethod
    async def save(
        self,
        conversation_id: str,
        *,
        ticket: int,
        new_events: Sequence[Mapping[str, Any]],
        state: Mapping[str, Any],
    ) -> TrackerRecord:
        """Append ``new_events``, replace the state and record ``ticket``, atomically.

        Raises :class:`StaleTicketError` and writes nothing if ``ticket`` is
        lower than the fence. Values must be JSON-serializable (``TypeError``
        or ``ValueError`` otherwise, before anything is written). Returns the
        record's tickets after the save (``events`` and ``state`` may be left
        empty by stores that would have to read them back).
        """

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
    """Serialize to strict JSON (no NaN), the one encoding every store uses."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


@dataclass(slots=True)
class _Stored:
    events: list[str] = field(default_factory=list)
    state: str = "{}"
    ticket: int = 0
    fence: int = 0


class InMemoryTrackerStore(TrackerStore):
    """Conversation state in this process's memory: the default.

    For one server process only; replicas and workers need a shared store
    such as ``RedisTrackerStore``. State is kept as JSON text, so what a
    handler holds after a load is its own copy.
    """

    def __init__(self) -> None:
        self._records: dict[str, _Stored] = {}
        self._saves = 0
        self._stale = 0

    def _refuse(self, conversation_id: str, ticket: int, fence: int) -> StaleTicketError:
        self._stale += 1
        return StaleTicketError(conversation_id, ticket, fence)

    async def load(self, conversation_id: str, *, ticket: int | None = None) -> TrackerRecord:
        stored = self._records.get(conversation_id)
        if ticket is not None:
            check_ticket(ticket)
            if stored is None:
                stored = self._records[conversation_id] = _Stored()
            if ticket < stored.fence:
                raise self._refuse(conversation_id, ticket, stored.fence)
            stored.fence = ticket
        if stored is None:
            return TrackerRecord(conversation_id)
        return TrackerRecord(
            conversation_id,
            events=[json.loads(event) for event in stored.events],
            state=json.loads(stored.state),
            ticket=stored.ticket,
            fence=stored.fence,
        )

    async def save(
        self,
        conversation_id: str,
        *,
        ticket: int,
        new_events: Sequence[Mapping[str, Any]],
        state: Mapping[str, Any],
    ) -> TrackerRecord:
        check_ticket(ticket)
        # Serialize first: a value that is not JSON must fail before any write.
        encoded_events = [dumps(dict(event)) for event in new_events]
        encoded_state = dumps(dict(state))
        stored = self._records.setdefault(conversation_id, _Stored())
        if ticket < stored.fence:
            raise self._refuse(conversation_id, ticket, stored.fence)
        stored.events.extend(encoded_events)
        stored.state = encoded_state
        stored.ticket = stored.fence = ticket
        self._saves += 1
        return TrackerRecord(conversation_id, ticket=ticket, fence=ticket)

    def statistics(self) -> Mapping[str, Any]:
        """Number of conversations, applied saves and refused stale tickets."""
        return {
            "backend": "in_memory",
            "conversations": len(self._records),
            "saves": self._saves,
            "stale_refused": self._stale,
        }

    def describe(self) -> str:
        return "in-memory tracker store"
