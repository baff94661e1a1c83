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

from pydantic import field_validator

from ..config import OptionalSeconds, RedisSettings, parse_settings
from ..errors import ConfigError
from ..factory import load_class
from .tracker import InMemoryTrackerStore, TrackerStore

__all__ = ["TrackerStoreSettings", "create_tracker_store"]

SECTION = "tracker_store"


class TrackerStoreSettings(RedisSettings):
    """The whole ``tracker_store:`` block.

    ``type``: ``in_memory``, ``redis`` or a dotted class path. ``expire_after``
    (seconds, Redis only): forget a conversation idle that long; unset keeps
    conversations for ever.
    """

    expire_after: OptionalSeconds = None

    @field_validator("type", mode="before")
    @classmethod
    def _check_type(cls, value: Any) -> Any:
        if value is None:
            return "in_memory"
        if not isinstance(value, str) or not value.strip():
            raise ValueError("type must be 'in_memory', 'redis' or a dotted path to a TrackerStore class")
        return value


def create_tracker_store(config: Mapping[str, Any] | None) -> TrackerStore:
    """Build the store that a ``tracker_store:`` mapping describes.

    ``None`` (no block) gives :class:`InMemoryTrackerStore`. Any bad value
    raises :class:`~convlock.ConfigError` naming the key and the fix.
    """
    if config is None:
        return InMemoryTrackerStore()
    if not isinstance(config, Mapping):
        raise ConfigError(f"{SECTION}: expected a mapping of keys, got {type(config).__name__}")
    kind = config.get("type")
    if isinstance(kind, str) and "." in kind.strip():
        cls: type[TrackerStore] = load_class(kind.strip(), TrackerStore, key=f"{SECTION}.type")
        kwargs = {str(key): value for key, value in config.items() if key != "type"}
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(
                f"{SECTION}: {kind} does not accept these keys ({', '.join(kwargs) or 'none'}): {exc}"
            ) from None

    settings = parse_settings(TrackerStoreSettings, config, section=SECTION)
    if settings.type == "in_memory":
        return InMemoryTrackerStore()
    if settings.type == "redis":
        from .redis_tracker import RedisTrackerStore  # imported late: redis is heavy

        return RedisTrackerStore.from_settings(settings, expire_after=settings.expire_after)
    raise ConfigError(
        f"{SECTION}.type: got {settings.type!r}; use 'in_memory', 'redis', or the dotted "
        "path of a TrackerStore subclass such as 'mypackage.stores.MyTrackerStore'"
    )
