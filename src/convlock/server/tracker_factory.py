"""Building a tracker store from the ``tracker_store:`` block of ``endpoints.yml``.

The block follows the ``lock_store:`` conventions exactly: ``type`` is
``in_memory`` (the default), ``redis``, or the dotted path of a
:class:`~convlock.server.tracker.TrackerStore` subclass constructed with the
block's other keys; ``redis`` takes the same connection keys as the lock
store, plus ``expire_after``, ``remember_message_ids`` (both types),
``min_replicas_acked`` and ``replica_ack_timeout``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field, model_validator

from ..config import OptionalSeconds, StoreSettings
from ..factory import build_store
from .tracker import (
    DEFAULT_MAX_EVENT_HISTORY,
    DEFAULT_REMEMBER_MESSAGE_IDS,
    DEFAULT_RETAIN_EVENTS,
    InMemoryTrackerStore,
    TrackerStore,
)

__all__ = ["TrackerStoreSettings", "create_tracker_store"]


class TrackerStoreSettings(StoreSettings):
    """The whole ``tracker_store:`` block.

    ``type``: ``in_memory``, ``redis`` or a dotted class path. ``expire_after``
    (seconds, Redis only): forget a conversation idle that long; unset keeps
    conversations for ever. ``remember_message_ids``: how many message IDs
    (with their replies) each conversation remembers for exactly-once
    delivery. ``max_event_history``: how many of its most recent events a
    handler sees (default 100, at most 1000); older ones are read on demand.
    ``retain_events``: how many of its most recent events a conversation
    keeps (default 10,000). ``min_replicas_acked`` (Redis only): replicas that must confirm
    a save, with ``WAIT``, within ``replica_ack_timeout`` seconds before it
    is acknowledged; unset means 1 in Sentinel mode and 0 otherwise.
    ``replica_ack_timeout`` defaults to 1 s, or half of ``socket_timeout`` if
    that is shorter.
    """

    expire_after: OptionalSeconds = None
    max_event_history: int = Field(default=DEFAULT_MAX_EVENT_HISTORY, ge=1, le=1000)
    retain_events: int = Field(default=DEFAULT_RETAIN_EVENTS, ge=1, le=100_000_000)
    remember_message_ids: int = Field(default=DEFAULT_REMEMBER_MESSAGE_IDS, ge=1, le=1_000_000)
    min_replicas_acked: int | None = Field(default=None, ge=0, le=100)
    replica_ack_timeout: OptionalSeconds = None

    @model_validator(mode="after")
    def _window_within_retention(self) -> TrackerStoreSettings:
        if self.max_event_history > self.retain_events:
            raise ValueError(
                f"max_event_history ({self.max_event_history}) cannot exceed retain_events "
                f"({self.retain_events}): a load cannot return events the store no longer keeps"
            )
        return self

    @model_validator(mode="after")
    def _ack_within_socket_timeout(self) -> TrackerStoreSettings:
        if self.replica_ack_timeout is not None and self.replica_ack_timeout >= self.socket_timeout:
            raise ValueError(
                f"replica_ack_timeout ({self.replica_ack_timeout:g}s) must be shorter than socket_timeout "
                f"({self.socket_timeout:g}s), or every WAIT for replicas would look like a dead Redis; "
                "lower replica_ack_timeout or raise socket_timeout"
            )
        return self


def create_tracker_store(config: Mapping[str, Any] | None) -> TrackerStore:
    """Build the store that a ``tracker_store:`` mapping describes.

    ``None`` (no block) gives :class:`InMemoryTrackerStore`. Any bad value
    raises :class:`~convlock.ConfigError` naming the key and the fix.
    """
    return build_store(
        config,
        section="tracker_store",
        base=TrackerStore,
        settings_model=TrackerStoreSettings,
        builders={"in_memory": _in_memory, "redis": _redis},
        default=InMemoryTrackerStore,
    )


def _in_memory(settings: TrackerStoreSettings) -> TrackerStore:
    return InMemoryTrackerStore(
        remember_message_ids=settings.remember_message_ids,
        max_event_history=settings.max_event_history,
        retain_events=settings.retain_events,
    )


def _redis(settings: TrackerStoreSettings) -> TrackerStore:
    from .redis_tracker import RedisTrackerStore  # imported late: redis is heavy

    return RedisTrackerStore.from_settings(
        settings,
        expire_after=settings.expire_after,
        remember_message_ids=settings.remember_message_ids,
        max_event_history=settings.max_event_history,
        retain_events=settings.retain_events,
        min_replicas_acked=settings.min_replicas_acked,
        replica_ack_timeout=settings.replica_ack_timeout or min(1.0, settings.socket_timeout / 2),
    )
