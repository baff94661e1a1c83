"""RedisLockStore over TLS, with an ACL user, through Sentinel and on a Redis Cluster.

The servers are session-wide fixtures (``conftest.py``) and are not flushed
between tests, so every test here uses its own ``key_prefix`` and checks
that it leaves no key under it. They skip only when the redis-server binary
cannot run the setup (the fixture's skip reason says why).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable
from typing import Any

import pytest

from convlock import LockStoreSettings, LockStoreUnavailable
from convlock.redis import RedisLockStore
from redis_procs import ClusterSetup, RedisProcess, SentinelSetup


def _prefix() -> str:
    return f"m{uuid.uuid4().hex[:8]}"


def _keys(nodes: Iterable[RedisProcess], prefix: str) -> list[str]:
    found: list[str] = []
    for node in nodes:
        with node.client() as client:
            found += [str(k) for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
    return found


async def _exercise(store: RedisLockStore, conversation_ids: list[str]) -> None:
    """Hold, contend, hand off and inspect on every conversation; check FIFO and fencing.

    The waiters use a second store on the same client, which the scripts
    see as another process, so each hand-off crosses "processes" through a
    Redis wake-up (a hand-off inside one store needs none).
    """
    other = RedisLockStore(store.client, key_prefix=store.key_prefix, lifetime=store.lifetime)
    try:
        for cid in conversation_ids:
            order: list[int] = []
            async with store.lock(cid) as held:
                first = held.ticket

                async def waiter(cid: str = cid, order: list[int] = order) -> None:
                    async with other.lock(cid) as later:
                        order.append(later.ticket)

                tasks = [asyncio.create_task(waiter())]
                await _until_waiting(store, cid, 1)
                tasks.append(asyncio.create_task(waiter()))
                await _until_waiting(store, cid, 2)
                snapshot = await store.inspect(cid)
                assert snapshot is not None
                assert snapshot.serving is not None
                assert snapshot.serving.ticket == first
            await asyncio.wait_for(asyncio.gather(*tasks), 5)
            assert order == sorted(order)
            assert order[0] > first
            assert await store.inspect(cid) is None
        assert other.statistics()["wakeups"] >= len(conversation_ids)
    finally:
        await other.aclose()


async def _until_waiting(store: RedisLockStore, cid: str, n: int) -> None:
    for _ in range(500):
        snapshot = await store.inspect(cid)
        if snapshot is not None and len(snapshot.waiting) == n:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"{n} waiters never queued on {cid!r}")


def _settings(**values: Any) -> LockStoreSettings:
    return LockStoreSettings.model_validate({"type": "redis", "socket_timeout": 2, **values})


# -- TLS and ACL


def _tls_settings(server: RedisProcess, prefix: str, **extra: Any) -> LockStoreSettings:
    files = server.tls_files
    assert files is not None
    return _settings(
        url="localhost",
        port=server.port,
        db=0,
        key_prefix=prefix,
        use_ssl=True,
        ssl_ca_certs=str(files.ca_cert),
        ssl_certfile=str(files.client_cert),
        ssl_keyfile=str(files.client_key),
        **extra,
    )


async def test_tls_with_client_certificate(redis_tls: RedisProcess) -> None:
    prefix = _prefix()
    store = RedisLockStore.from_settings(_tls_settings(redis_tls, prefix))
    try:
        assert "TLS" in store.statistics()["target"]
        await store.ping()
        await _exercise(store, ["tls:1", "tls:ü"])
    finally:
        await store.aclose()
    assert _keys([redis_tls], prefix) == []


async def test_tls_server_verified_without_client_certificate(redis_tls: RedisProcess) -> None:
    files = redis_tls.tls_files
    assert files is not None
    prefix = _prefix()
    settings = _settings(
        url="127.0.0.1", port=redis_tls.port, db=0, key_prefix=prefix, use_ssl=True, ssl_ca_certs=str(files.ca_cert)
    )
    store = RedisLockStore.from_settings(settings)
    try:
        async with store.lock("tls-only-ca") as held:
            assert held.ticket > 0
    finally:
        await store.aclose()
    assert _keys([redis_tls], prefix) == []


async def test_plain_text_to_a_tls_port_is_a_clear_error(redis_tls: RedisProcess) -> None:
    settings = _settings(url="127.0.0.1", port=redis_tls.port, db=0, key_prefix=_prefix(), socket_timeout=0.5)
    store = RedisLockStore.from_settings(settings)
    try:
        started = time.monotonic()
        with pytest.raises(LockStoreUnavailable, match=f"127.0.0.1:{redis_tls.port}"):
            async with store.lock("x"):
                pass
        assert time.monotonic() - started < 0.5 + 1.0
    finally:
        await store.aclose()


async def test_acl_user_with_password(redis_acl: RedisProcess) -> None:
    assert redis_acl.username is not None
    assert redis_acl.password is not None
    prefix = _prefix()
    base = {"url": "127.0.0.1", "port": redis_acl.port, "db": 0, "key_prefix": prefix}
    store = RedisLockStore.from_settings(
        _settings(**base, username=redis_acl.username, password=redis_acl.password)
    )
    try:
        await _exercise(store, ["acl"])
    finally:
        await store.aclose()
    assert _keys([redis_acl], prefix) == []

    wrong = RedisLockStore.from_settings(_settings(**base, username=redis_acl.username, password="not-it"))
    try:
        with pytest.raises(LockStoreUnavailable, match=f"127.0.0.1:{redis_acl.port}") as info:
            async with wrong.lock("acl"):
                pass
        assert "not-it" not in str(info.value)  # the message never carries the password
    finally:
        await wrong.aclose()


# -- Sentinel


async def test_sentinel_finds_the_master(redis_sentinel: SentinelSetup) -> None:
    prefix = _prefix()
    settings = _settings(
        deployment_mode="sentinel",
        endpoints=",".join(redis_sentinel.endpoints()),
        sentinel_service=redis_sentinel.service,
        db=0,
        key_prefix=prefix,
    )
    store = RedisLockStore.from_settings(settings)
    try:
        assert redis_sentinel.service in store.statistics()["target"]
        await store.ping()
        await _exercise(store, ["sentinel:1"])
        async with store.lock("on-master"):
            assert _keys([redis_sentinel.master], prefix) != []
    finally:
        await store.aclose()
    assert _keys([redis_sentinel.master], prefix) == []


async def test_sentinel_with_no_sentinel_listening_is_a_clear_error() -> None:
    import redis_procs

    port = redis_procs.free_port()
    settings = _settings(
        deployment_mode="sentinel", endpoints=f"127.0.0.1:{port}", key_prefix=_prefix(), socket_timeout=0.5
    )
    store = RedisLockStore.from_settings(settings)
    try:
        with pytest.raises(LockStoreUnavailable, match=f"Sentinel service 'mymaster' via 127.0.0.1:{port}"):
            async with store.lock("x"):
                pass
    finally:
        await store.aclose()


# -- Cluster


@pytest.mark.slow
async def test_cluster_spreads_conversations_and_keeps_each_on_one_node(redis_cluster: ClusterSetup) -> None:
    prefix = _prefix()
    settings = _settings(deployment_mode="cluster", endpoints=redis_cluster.endpoints(), key_prefix=prefix)
    store = RedisLockStore.from_settings(settings)
    ids = [f"user:{i}" for i in range(12)] + ["{hostile}", "*"]
    try:
        await store.ping()
        await _exercise(store, ids[:3])
        holds = [store.lock(cid, lifetime=0.6) for cid in ids]
        for hold in holds:
            await hold.__aenter__()
        try:
            used_nodes = set()
            for cid in ids:
                keys = store._space.keys(cid)
                node = redis_cluster.node_for_key(keys.queue)
                used_nodes.add(node.port)
                # Every key of the conversation lives on that one node.
                assert node.command("EXISTS", keys.state) == 1
            assert len(used_nodes) == 3
            # SCAN visits every node.
            assert sorted([c async for c in store.conversations()]) == sorted(ids)
            # Held past their lifetime: the pipelined renewals reach all nodes.
            # (Renewed every 0.2 s, so a busy machine's stalls of up to 0.4 s cost nothing.)
            await asyncio.sleep(0.9)
            assert not any(hold.lost for hold in holds)
            for hold in holds:
                await hold.ensure()
            assert store.statistics()["renewals"] >= len(ids)
            assert await store.force_release(ids[0]) == holds[0].ticket
            assert holds[0].lost
        finally:
            for hold in holds:
                await hold.__aexit__(None, None, None)
    finally:
        await store.aclose()
    assert _keys(redis_cluster.nodes, prefix) == []


def test_cluster_refuses_a_database_other_than_zero(redis_cluster: ClusterSetup) -> None:
    from convlock import ConfigError

    with pytest.raises(ConfigError, match="database 0"):
        RedisLockStore.from_settings(
            _settings(deployment_mode="cluster", endpoints=redis_cluster.endpoints(), db=3)
        )
