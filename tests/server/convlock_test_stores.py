"""A tracker store written against the interface before message IDs (no ``message_id`` or ``reply``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from convlock.server.tracker import InMemoryTrackerStore, TrackerRecord


class OldTrackerStore(InMemoryTrackerStore):
    """Loads and saves like the in-memory store, but its methods take no message-ID arguments."""

    async def load(self, conversation_id: str, *, ticket: int | None = None) -> TrackerRecord:  # type: ignore[override]
        return await super().load(conversation_id, ticket=ticket)

    async def save(  # type: ignore[override]
        self,
        conversation_id: str,
        *,
        ticket: int,
        new_events: Sequence[Mapping[str, Any]],
        state: Mapping[str, Any],
    ) -> TrackerRecord:
        return await super().save(conversation_id, ticket=ticket, new_events=new_events, state=state)
