"""The Redis backend of convlock, one part per module.

- :mod:`~convlock.redis.keys`: conversation ID to collision-free, slot-sharing key names (pure);
- :mod:`~convlock.redis.scripts`: every Lua script, named and commented, registered once;
- :mod:`~convlock.redis.connection`: the asyncio client for standard, Sentinel and Cluster;
- :mod:`~convlock.redis.store`: :class:`RedisLockStore`, which drives the scripts.

Importing this package imports redis-py; the in-memory store never does.
"""

from .store import RedisLockStore

__all__ = ["RedisLockStore"]
