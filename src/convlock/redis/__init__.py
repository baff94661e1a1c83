"""The Redis backend of convlock, one part per module.

- :mod:`~convlock.redis.keys`: conversation ID to collision-free, slot-sharing key names (pure);
- :mod:`~convlock.redis.scripts`: every Lua script, named and commented, registered once;
- :mod:`~convlock.redis.connection`: the asyncio client for standard, Sentinel and Cluster;
- :mod:`~convlock.redis.failover`: a Sentinel pool that drops its connections on a failover;
- :mod:`~convlock.redis.commands`: the budgeted, time-bounded, never re-sent command path;
- :mod:`~convlock.redis.wakeups`: the shared blocking readers that wake waiters of other processes;
- :mod:`~convlock.redis.companion`: work that rides on a lock's own two scripts;
- :mod:`~convlock.redis.store`: :class:`RedisLockStore`, which drives the scripts.

Importing this package imports redis-py; the in-memory store never does.
"""

from .store import RedisLockStore

__all__ = ["RedisLockStore"]
