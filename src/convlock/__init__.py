"""convlock: per-conversation FIFO ticket locks for replicated chat servers.

::

    store = create_lock_store(load_endpoints("endpoints.yml").get("lock_store"))
    async with store.lock(conversation_id) as held:
        ...  # one message of this conversation at a time, in arrival order

See :class:`LockStore` for the promises every store keeps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import LockStoreSettings, RedisSettings, load_endpoints
from .errors import ConfigError, LockError, LockLostError, LockStoreUnavailable, LockTimeoutError
from .factory import create_lock_store
from .memory import InMemoryLockStore
from .store import HeldLock, LockSnapshot, LockStore, TicketLease

if TYPE_CHECKING:
    from .redis import RedisLockStore

__all__ = [
    "ConfigError",
    "HeldLock",
    "InMemoryLockStore",
    "LockError",
    "LockLostError",
    "LockSnapshot",
    "LockStore",
    "LockStoreSettings",
    "LockStoreUnavailable",
    "LockTimeoutError",
    "RedisLockStore",
    "RedisSettings",
    "TicketLease",
    "create_lock_store",
    "load_endpoints",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # RedisLockStore is imported on first use, so that programs using only the
    # in-memory store do not pay for importing the redis client.
    if name == "RedisLockStore":
        from .redis import RedisLockStore

        return RedisLockStore
    raise AttributeError(f"module 'convlock' has no attribute {name!r}")
