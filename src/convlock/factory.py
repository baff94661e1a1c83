"""Building stores from ``endpoints.yml`` blocks: ``lock_store:`` here, and the
shared rules that ``tracker_store:`` follows too.

Every store block reads the same way: ``type`` is a built-in name, or the
dotted path of a subclass of the block's base class, which is then built
with the block's other keys as keyword arguments; a missing block means the
in-memory default.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .config import LockStoreSettings, StoreSettings, parse_settings
from .errors import ConfigError
from .memory import InMemoryLockStore
from .store import LockStore

__all__ = ["build_store", "create_lock_store", "load_class"]

StoreT = TypeVar("StoreT")
SettingsT = TypeVar("SettingsT", bound=StoreSettings)


def build_store(
    config: Mapping[str, Any] | None,
    *,
    section: str,
    base: type[Any],
    settings_model: type[SettingsT],
    builders: Mapping[str, Callable[[SettingsT], StoreT]],
    default: Callable[[], StoreT],
) -> StoreT:
    """Build the store a config block describes, by the rules every store block shares.

    ``None`` gives ``default()``. A dotted ``type`` names a subclass of
    ``base`` (an abstract class, hence typed loosely), built with the other
    keys (not validated here: they are that class's own). Otherwise the
    block is validated with ``settings_model`` and ``type`` picks one of
    ``builders``. Every bad value is a ``ConfigError`` naming
    ``section.key``.
    """
    if config is None:
        return default()
    if not isinstance(config, Mapping):
        raise ConfigError(f"{section}: expected a mapping of keys, got {type(config).__name__}")
    kind = config.get("type")
    if isinstance(kind, str) and "." in kind.strip():
        cls: Callable[..., StoreT] = load_class(kind.strip(), base, key=f"{section}.type")
        kwargs = {str(key): value for key, value in config.items() if key != "type"}
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(
                f"{section}: {kind} does not accept these keys ({', '.join(kwargs) or 'none'}): {exc}"
            ) from None
    settings = parse_settings(settings_model, config, section=section)
    builder = builders.get(settings.type)
    if builder is None:
        names = ", ".join(repr(name) for name in builders)
        raise ConfigError(
            f"{section}.type: got {settings.type!r}; use {names}, or the dotted path of a "
            f"{base.__name__} subclass such as 'mypackage.stores.My{base.__name__}'"
        )
    return builder(settings)


def create_lock_store(config: Mapping[str, Any] | None) -> LockStore:
    """Build the store that a ``lock_store:`` mapping describes.

    ``None`` (no block) gives the default ``InMemoryLockStore``. ``type``
    picks the store: ``in_memory``, ``redis``, or a dotted path such as
    ``mypackage.stores.MyLockStore`` to a ``LockStore`` subclass, which is
    constructed with the block's other keys as keyword arguments. Any bad
    value raises :class:`~convlock.ConfigError` naming the key.
    """
    return build_store(
        config,
        section="lock_store",
        base=LockStore,
        settings_model=LockStoreSettings,
        builders={"in_memory": _in_memory_lock_store, "redis": _redis_lock_store},
        default=InMemoryLockStore,
    )


def _in_memory_lock_store(settings: LockStoreSettings) -> LockStore:
    return InMemoryLockStore(lifetime=settings.lifetime, wait_timeout=settings.wait_timeout)


def _redis_lock_store(settings: LockStoreSettings) -> LockStore:
    from .redis import RedisLockStore  # imported late: redis is heavy

    return RedisLockStore.from_settings(settings)


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
