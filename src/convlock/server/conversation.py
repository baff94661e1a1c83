"""What a handler receives: the incoming :class:`Message` and its :class:`Conversation`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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
    * ``events``: everything stored so far, oldest first, as dicts with an
      ``"event"`` key (``"user"`` or ``"bot"``). Read it; do not change it:
      the server appends this message and the handler's responses itself.
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

    def user_messages(self) -> list[str]:
        """The texts of the user's earlier messages, oldest first."""
        return [str(event.get("text", "")) for event in self.events if event.get("event") == "user"]
