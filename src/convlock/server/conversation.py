"""What a handler receives: the incoming :class:`Message` and its :class:`Conversation`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Reads one page of stored events: (after, limit) -> events numbered after+1...
EventPager = Callable[[int, int], Awaitable[list[dict[str, Any]]]]

__all__ = ["Conversation", "Message"]


@dataclass(frozen=True, slots=True)
class Message:
    """One incoming message: who sent it, its text, the client's metadata and message ID.

    ``message_id`` is the client's ID for this message (the body's
    ``message_id`` or the ``Idempotency-Key`` header), or None if it sent none.
    """

    sender: str
    text: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    message_id: str | None = None


@dataclass(slots=True)
class Conversation:
    """The conversation a message belongs to, as the handler sees it.

    * ``conversation_id``: the sender ID, which names the conversation.
    * ``events``: the most recent stored events (at most the tracker
      store's ``max_event_history``, default 100), oldest first, as dicts
      with an ``"event"`` key (``"user"`` or ``"bot"``). Read it; do not
      change it: the server appends this message and the handler's responses
      itself. Older events: ``await conversation.older_events()``.
    * ``event_count``: how many events the conversation has stored in all.
    * ``state``: a JSON dict the handler may change freely; it is saved after
      the handler returns, and only then. If the handler raises or times out
      the change is dropped.
    * ``turn``: this message's number in the conversation, counting from 1.
    * ``ticket``: the lock's fencing token for this message.
    """

    conversation_id: str
    events: Sequence[Mapping[str, Any]]
    state: dict[str, Any]
    turn: int
    ticket: int
    event_count: int = -1
    _pager: EventPager | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.event_count < 0:
            self.event_count = len(self.events)

    def user_messages(self) -> list[str]:
        """The texts of the user's earlier messages in ``events``, oldest first."""
        return [str(event.get("text", "")) for event in self.events if event.get("event") == "user"]

    async def older_events(self, limit: int = 100, *, before: int | None = None) -> list[dict[str, Any]]:
        """Up to ``limit`` stored events that come before event number ``before``, oldest first.

        Events count from 1; ``before`` defaults to the first event of
        ``events``, so successive calls with ``before`` set to the number of
        the first event returned walk back through the history, a page at a
        time (events dropped by the store's retention are not returned). It
        reads the store under this message's lock, so what it returns is
        consistent with ``events``.
        """
        first = self.event_count - len(self.events) + 1 if before is None else before
        start = max(1, first - max(0, limit))
        if self._pager is None or first <= 1:
            return []
        return (await self._pager(start - 1, first - start))[: first - start]
