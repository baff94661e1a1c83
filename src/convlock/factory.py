"""Building a lock store from the ``lock_store:`` block of ``endpoints.yml``."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from .config import LockStoreSettings, parse_settings
from .errors import ConfigError
from .memory import InMemoryLockStore
from .store import LockStore

__all__ = ["create_lock_store", "load_class"]

SECTION = "lock_store"


def create_lock_store(config: Mapping[str, Any] | None) -> LockStore:
    """Build the store that a ``lock_store:`` mapping describes.

    ``None`` (no block) gives the default ``InMemoryLockStore``. ``type``
    picks the store: ``in_memory``, ``redis``, or a dotted path such as
    ``mypackage.stores.MyLockStore`` to a ``LockStore`` subclass, which is
    constructed with the block's other keys as keyword arguments. Any bad
    value raises :class:`~convlock.ConfigError` naming the key.
    """
    if config is None:
        return InMemoryLockStore()
    if not isinstance(config, Mapping):
        raise ConfigError(f"{SECTION}: expected a mapping of keys, got {type(config).__name__}")
    kind = config.get("type")
    if isinstance(kind, str) and "." in kind.strip():
        cls: type[LockStore] = load_class(kind.strip(), LockStore, key=f"{SECTION}.type")
        kwargs = {str(key): value for key, value in config.items() if key != "type"}
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(
                f"{SECTION}: {kind} does not accept these keys ({', '.join(kwargs) or 'none'}): {exc}"
            ) from None

    settings = parse_settings(LockStoreSettings, config, section=SECTION)
    if settings.type == "in_memory":
        return InMemoryLockStore(lifetime=settings.lifetime, wait_timeout=settings.wait_timeout)
    if settings.type == "redis":
        from .redis_store import RedisLockStore  # imported late: redis is heavy

        store: LockStore = RedisLockStore.from_settings(settings)
        return store
    raise ConfigError(
        f"{SECTION}.type: got {settings.type!r}; use 'in_memory', 'redis', or the dotted "
        "path of a LockStore subclass such as 'mypackage.stores.MyLockStore'"
    )


def load_class(path: str, base: type[Any], *, key: str) -> type[Any]:
    """Import ``module.Class`` from a dotted path and check it subclasses ``base``."""
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import module {module_name!r} for {path!r}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, base):
        raise ConfigError(
            f"{key}: {path!r} is not a subclass of {base.__module__}.{base.__qualname__}; "
            f"name a class that derives from {base.__name__}"
        )
    return cls
