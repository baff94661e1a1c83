"""``convlock run``: a chat message server whose replicas share locks and fenced state.

Modules, in the order data flows: ``options`` (flags and endpoints.yml to
stores), ``tracker``/``redis_tracker``/``redis_tracker_scripts``/``tracker_factory``
(conversation state, message IDs), ``handlers``/``conversation`` (the handler protocol), ``validation``
and ``channel`` (the webhook), ``admin`` (health, locks, tracker, metrics),
``metrics``, ``openapi``, ``webhook_asgi`` (the chat channel answered in
raw ASGI in front of the app, the hot route) and ``app`` (the Starlette app).
"""

from __future__ import annotations

from .conversation import Conversation, Message
from .handlers import Handler, HandlerResult
from .tracker import (
    InMemoryTrackerStore,
    StaleTicketError,
    TrackerNotReplicated,
    TrackerRecord,
    TrackerStore,
    TrackerStoreUnavailable,
)

__all__ = [
    "Conversation",
    "Handler",
    "HandlerResult",
    "InMemoryTrackerStore",
    "Message",
    "StaleTicketError",
    "TrackerNotReplicated",
    "TrackerRecord",
    "TrackerStore",
    "TrackerStoreUnavailable",
]
