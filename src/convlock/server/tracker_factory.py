"""Building a tracker store from the ``tracker_store:`` block of ``endpoints.yml``.

The block follows the ``lock_store:`` conventions exactly: ``type`` is
``in_memory`` (the default), ``redis``, or the dotted path of a
:class:`~convlock.server.tracker.TrackerStore` subclass constructed with the
block's other keys; ``redis`` takes the same connection keys as the lock
store, plus ``expire_after``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import OptionalSeconds, StoreSettings
from ..factory import build_store
from .tracker import InMemoryTrackerStore, TrackerStore

__all__ = ["TrackerStoreSettings", "create_tracker_store"]


class TrackerStoreSettings(StoreSettings):
    """The whole ``tracker_store:`` block.

    ``type``: ``in_memory``, ``redis`` or a dotted class path. ``expire_after``
    (seconds, Redis only): forget a conversation idle that long; unset keeps
    conversations for ever.
    """

    expire_after: OptionalSeconds = None


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
    return InMemoryTrackerStore()


def _redis(settings: TrackerStoreSettings) -> TrackerStore:
    from .redis_tracker import RedisTrackerStore  # imported late: redis is heavy

    return RedisTrackerStore.from_settings(settings, expire_after=settings.expire_after)
