"""Sentinel clients drop their connections to a master that refuses writes or was replaced.

Against real Sentinels: ``NOREPLICAS`` is provoked with ``min-replicas-to-write``
on the shared setup (and undone); ``+switch-master`` with ``SENTINEL
FAILOVER`` on a private one.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError

import redis_procs
from convlock import LockStoreSettings, LockStoreUnavailable
from convlock.config import RedisSettings
from convlock.redis import RedisLockStore
from convlock.redis.connection import create_client
from convlock.redis.failover import FailoverAwarePool, _listeners, is_failover_error
from redis_procs import SentinelSetup


def test_failover_replies_are_recognised() -> None:
    assert is_failover_error(ReadOnlyError("You can't write against a read only replica."))
    assert is_failover_error(ResponseError("NOREPLICAS Not enough good replicas to write."))
    assert is_failover_error(ResponseError("ERR Error running script: @user_script:3: -READONLY You can't write"))
    assert not is_failover_error(ResponseError("WRONGTYPE Operation against a key"))
    assert not is_failover_error(RedisConnectionError("NOREPLICAS lookalike"))


def _settings(setup: SentinelSetup) -> RedisSettings:
    return RedisSettings(deployment_mode="sentinel", endpoints=setup.endpoints(), db=0, socket_timeout=3)


async def test_noreplicas_drops_the_pool_and_the_store_recovers(redis_sentinel: SentinelSetup) -> None:
    store = RedisLockStore(LockStoreSettings.model_validate({**_settings(redis_sentinel).model_dump(), "key_prefix": "norep"}))
    client = store.client
    assert isinstance(client, Redis)
    pool = client.connection_pool
    assert isinstance(pool, FailoverAwarePool)
    master = redis_sentinel.master
    try:
        async with store.lock("c"):
            pass
        assert pool.failovers_seen == 0
        # The lock's scripts go through the lane, which reads its replies
        # without read_response: the failover reply must be caught there too.
        lane = store._commands._lane
        assert lane is not None
        assert lane.reads_in_callbacks
        master.command("CONFIG", "SET", "min-replicas-to-write", "2")  # there is one replica
        try:
            with pytest.raises(LockStoreUnavailable, match="no longer a writable master"):
                async with store.lock("c"):
                    pass
            assert pool.failovers_seen == 1
            assert pool.master_address is None, "the next connection asks the Sentinels again"
        finally:
            master.command("CONFIG", "SET", "min-replicas-to-write", "0")
        async with store.lock("c") as held:
            assert held.ticket > 0
    finally:
        await store.aclose()
    assert not [key for key in _listeners if key[2] == redis_sentinel.service], "the listener stopped with the client"


@pytest.mark.slow
async def test_switch_master_moves_writes_to_the_new_master_before_the_old_one_is_demoted(tmp_path: Path) -> None:
    setup = redis_procs.start_sentinel_setup(tmp_path, sentinels=1)
    client = create_client(_settings(setup), retries=0)
    old, [new] = setup.master, setup.replicas
    try:
        await client.set("k", "before")  # opens a pooled connection to the old master and starts listening
        assert isinstance(client, Redis)
        pool = client.connection_pool
        assert isinstance(pool, FailoverAwarePool)
        setup.fail_over()
        deadline = time.monotonic() + 20
        while pool.failovers_seen == 0:
            assert time.monotonic() < deadline, "+switch-master never reached the pool"
            await asyncio.sleep(0.05)
        await client.set("k", "after")
        assert new.command("GET", "k") == "after", "written to the new master"
        # Sentinel demotes the old master only some seconds after the switch; until
        # then it would have accepted (and later dropped) the write.
        assert old.info("replication")["role"] == "master" or old.command("GET", "k") == "after"
    finally:
        await client.aclose()
        setup.stop()
