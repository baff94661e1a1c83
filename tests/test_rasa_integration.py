"""ConvlockLockStore through Rasa Pro 3.21's own code: ``read_endpoint_config`` and ``LockStore.create``.

Every store here is built the way a Rasa user configures one, from an
endpoints.yml file, against real redis-server processes (standalone,
Sentinel, TLS). The multi-process tests run replicas that each do Rasa's
``async with store.lock(sender_id, wait_time_in_seconds=0.01)`` around a
non-atomic read-modify-write (the ``rasa`` command of ``convlock.bench.worker``,
driven by tests/rasa_workload.py).

The last test runs Rasa's own ``redis`` and ``concurrent_redis`` stores on
the same workload and prints what they lose: that is the comparison, not
convlock's result, so it asserts only that the workload ran.

Rasa 3.6 (open source) is not tested: it pins redis < 5 and Python < 3.11,
so it cannot share an environment with convlock (redis 8, Python 3.11+).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from rasa.core.lock_store import LockError as RasaLockError
from rasa.core.lock_store import LockStore as RasaLockStore
from rasa.utils.endpoints import read_endpoint_config

from convlock import (
    ConfigError,
    InMemoryLockStore,
    LockError,
    LockStoreUnavailable,
    LockTimeoutError,
    RedisLockStore,
)
from convlock.integrations.rasa import (
    ConvlockLockStore,
    HeldTicketLock,
    RasaLockStoreUnavailable,
    RasaLockTimeoutError,
    UnsupportedLockStoreOperation,
)
from rasa_workload import Outcome, run_replicas
from redis_procs import RedisProcess, SentinelSetup, free_port

ADAPTER = "convlock.integrations.rasa.ConvlockLockStore"


def write_endpoints(folder: Path, **lock_store: Any) -> Path:
    """An endpoints.yml whose ``lock_store:`` block holds ``lock_store``; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"endpoints-{uuid.uuid4().hex[:8]}.yml"  # a new name: Rasa caches by file name
    path.write_text(yaml.safe_dump({"lock_store": lock_store}, sort_keys=False), encoding="utf-8")
    return path


def through_rasa(path: Path) -> Any:
    """The lock store Rasa's own factory builds from the endpoints.yml at ``path``."""
    return RasaLockStore.create(read_endpoint_config(str(path), "lock_store"))


def keys_with_prefix(proc: RedisProcess, prefix: str) -> list[str]:
    with proc.client() as client:
        return list(client.scan_iter(match=f"{prefix}:*", count=1000))


def prefix() -> str:
    return f"rasa{uuid.uuid4().hex[:8]}"


# -- the factory builds it


async def test_rasa_factory_builds_the_adapter_from_endpoints_yml(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    key_prefix = prefix()
    path = write_endpoints(
        tmp_path,
        type=ADAPTER,
        host=redis_server.host,
        port=redis_server.port,
        db=0,
        key_prefix=key_prefix,
        socket_timeout=3,
        lifetime=7,
    )
    store = through_rasa(path)
    assert isinstance(store, ConvlockLockStore)
    assert isinstance(store, RasaLockStore)
    assert isinstance(store.store, RedisLockStore)
    assert store.store.key_prefix == key_prefix
    assert store.store.lifetime == 7.0
    try:
        async with store.lock("alice", wait_time_in_seconds=0.01) as lock:
            assert isinstance(lock, HeldTicketLock)
            # Rasa's TicketLock view: the held ticket is the one now serving.
            assert lock.now_serving == lock.ticket
            assert not lock.is_locked(lock.ticket)
            assert lock.conversation_id == "alice"
            snapshot = await store.inspect("alice")
            assert snapshot is not None
            assert snapshot.serving is not None
            assert snapshot.serving.ticket == lock.ticket
            assert keys_with_prefix(redis_server, key_prefix) != []
        assert await store.inspect("alice") is None
    finally:
        await store.aclose()
    assert keys_with_prefix(redis_server, key_prefix) == []


def test_deprecated_url_key_still_reaches_redis(tmp_path: Path, redis_server: RedisProcess) -> None:
    path = write_endpoints(tmp_path, type=ADAPTER, url=redis_server.host, port=redis_server.port, db=0)
    store = through_rasa(path)
    asyncio.run(_one_cycle_then_close(store))


async def _one_cycle_then_close(store: ConvlockLockStore) -> None:
    try:
        async with store.lock("url-key"):
            pass
    finally:
        await store.aclose()


async def test_backend_in_memory_for_a_single_process(tmp_path: Path) -> None:
    store = through_rasa(write_endpoints(tmp_path, type=ADAPTER, backend="in_memory", lifetime=3))
    assert isinstance(store.store, InMemoryLockStore)
    assert store.store.lifetime == 3.0
    order: list[int] = []

    async def message(n: int) -> None:
        async with store.lock("bob"):
            order.append(n)
            await asyncio.sleep(0.01)

    await asyncio.gather(*(message(n) for n in range(5)))
    assert order == [0, 1, 2, 3, 4]  # FIFO: tickets drawn in task start order


def test_in_memory_with_several_rasa_workers_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANIC_WORKERS", "4")
    with pytest.raises(ConfigError, match=r"lock_store\.backend: got .in_memory. with SANIC_WORKERS=4"):
        through_rasa(write_endpoints(tmp_path, type=ADAPTER, backend="in_memory"))


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"port": "sixty"}, "lock_store.port"),
        ({"port": 70000}, "lock_store.port"),
        ({"db": -1}, "lock_store.db"),
        ({"lifetime": -5}, "lock_store.lifetime"),
        ({"wait_timeout": "soon"}, "lock_store.wait_timeout"),
        ({"deployment_mode": "swarm"}, "lock_store.deployment_mode"),
        ({"endpoints": ["nocolon"]}, "lock_store.endpoints"),
        ({"ssl_ca_certs": "/no/such/ca.pem"}, "lock_store.ssl_ca_certs"),
        ({"socket_timeout": 0}, "lock_store.socket_timeout"),
        ({"key_prefix": "a{b}"}, "lock_store.key_prefix"),
        ({"backend": "disk"}, "lock_store.backend"),
    ],
)
def test_a_bad_key_is_named(tmp_path: Path, keys: dict[str, Any], named: str) -> None:
    path = write_endpoints(tmp_path, type=ADAPTER, **keys)
    with pytest.raises(ConfigError, match=named):
        through_rasa(path)


def test_url_and_host_together_are_refused(tmp_path: Path) -> None:
    path = write_endpoints(tmp_path, type=ADAPTER, url="a.example", host="b.example")
    with pytest.raises(ConfigError, match="either 'url' or its alias 'host'"):
        through_rasa(path)


# -- lock(): Rasa's signature, our semantics


async def test_lock_lifetime_is_the_lease_and_is_renewed(tmp_path: Path, redis_server: RedisProcess) -> None:
    key_prefix = prefix()
    store = through_rasa(
        write_endpoints(
            tmp_path,
            type=ADAPTER,
            host=redis_server.host,
            port=redis_server.port,
            db=0,
            key_prefix=key_prefix,
        )
    )
    try:
        async with store.lock("carol", lock_lifetime=1, wait_time_in_seconds=0.01) as lock:
            snapshot = await store.inspect("carol")
            assert snapshot is not None
            assert snapshot.serving is not None
            assert 0 < snapshot.serving.expires_in <= 1.0  # lock_lifetime, not the store's 60 s
            await asyncio.sleep(2.5)  # well past one lease: renewal keeps it
            assert not lock.lost
            await lock.ensure()
            snapshot = await store.inspect("carol")
            assert snapshot is not None
            assert snapshot.serving is not None
            assert snapshot.serving.ticket == lock.ticket
    finally:
        await store.aclose()
    assert keys_with_prefix(redis_server, key_prefix) == []


async def test_a_timeout_is_rasas_lock_error_and_ours(tmp_path: Path, redis_server: RedisProcess) -> None:
    store = through_rasa(
        write_endpoints(
            tmp_path,
            type=ADAPTER,
            host=redis_server.host,
            port=redis_server.port,
            db=0,
            key_prefix=prefix(),
            wait_timeout=0.2,
        )
    )
    try:
        async with store.lock("dave"):
            with pytest.raises(RasaLockError) as caught:
                async with store.lock("dave", wait_time_in_seconds=0.01):
                    pytest.fail("granted while held")
        error = caught.value
        assert isinstance(error, RasaLockTimeoutError)
        assert isinstance(error, LockTimeoutError)
        assert isinstance(error, LockError)
        assert isinstance(error, TimeoutError)
        assert error.conversation_id == "dave"
        assert "dave" in str(error)
        # The abandoned ticket was withdrawn: the next message gets in at once.
        async with asyncio.timeout(2), store.lock("dave"):
            pass
    finally:
        await store.aclose()


async def test_an_unreachable_redis_is_rasas_lock_error_and_ours(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    store = through_rasa(
        write_endpoints(tmp_path, type=ADAPTER, host="127.0.0.1", port=port, socket_timeout=1)
    )
    try:
        with pytest.raises(RasaLockError) as caught:
            async with store.lock("erin"):
                pytest.fail("granted without a Redis")
        assert isinstance(caught.value, RasaLockStoreUnavailable)
        assert isinstance(caught.value, LockStoreUnavailable)
        assert f"127.0.0.1:{port}" in str(caught.value)
    finally:
        await store.aclose()


async def test_an_exception_in_the_block_releases_the_lock(tmp_path: Path) -> None:
    store = through_rasa(write_endpoints(tmp_path, type=ADAPTER, backend="in_memory"))
    with pytest.raises(KeyError):
        async with store.lock("frank"):
            raise KeyError("handler failed")
    assert await store.inspect("frank") is None


@pytest.mark.parametrize(
    ("method", "args", "pointer"),
    [
        ("get_lock", ("c",), "inspect"),
        ("get_or_create_lock", ("c",), "store.lock"),
        ("save_lock", (None,), "store.lock"),
        ("delete_lock", ("c",), "force_release"),
        ("issue_ticket", ("c", 10), "store.lock"),
        ("update_lock", ("c",), "lapsed leases"),
        ("is_someone_waiting", ("c",), "inspect"),
        ("finish_serving", ("c", 1), "releases"),
        ("cleanup", ("c", 1), "releases"),
    ],
)
def test_rasas_blob_methods_explain_why_they_do_not_apply(
    tmp_path: Path, method: str, args: tuple[Any, ...], pointer: str
) -> None:
    store = through_rasa(write_endpoints(tmp_path, type=ADAPTER, backend="in_memory"))
    with pytest.raises(UnsupportedLockStoreOperation, match="JSON TicketLock blob") as caught:
        getattr(store, method)(*args)
    assert isinstance(caught.value, NotImplementedError)
    assert pointer.lower() in str(caught.value).lower()


async def test_force_release_is_the_async_delete_lock(tmp_path: Path) -> None:
    store = through_rasa(write_endpoints(tmp_path, type=ADAPTER, backend="in_memory"))
    async with store.lock("gina") as lock:
        assert await store.force_release("gina") == lock.ticket
        assert lock.lost
        assert lock.is_locked(lock.ticket)  # Rasa's view agrees: no longer served
        with pytest.raises(RasaLockError):
            await lock.ensure()


def test_without_rasa_the_import_says_what_to_install() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["rasa"] = None  # as if Rasa were not installed
        try:
            import convlock.integrations.rasa
        except ImportError as exc:
            print(exc)
        else:
            print("imported")
        import convlock  # the core still imports
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'rasa-pro>=3.21' convlock" in result.stdout, result.stdout
    assert "convlock itself does not depend on Rasa" in result.stdout


# -- replicas through Rasa's own code path


def assert_flawless(outcome: Outcome, processes: int) -> None:
    assert outcome.errors == ()
    assert outcome.lock_errors == 0, outcome.summary()
    assert outcome.unfinished == 0, outcome.summary()
    assert outcome.completed == outcome.messages, outcome.summary()
    assert outcome.counter == outcome.messages, outcome.summary()  # exact: no update lost
    assert outcome.lost_updates == 0
    assert outcome.overlaps == 0, outcome.summary()
    assert outcome.out_of_order == 0, outcome.summary()  # served in ticket (FIFO) order
    assert outcome.processes_served == processes
    assert outcome.handoffs >= 10, f"only {outcome.handoffs} hand-offs: the replicas did not contend"


@pytest.mark.slow
@pytest.mark.parametrize("tasks", [1, 4], ids=["one-at-a-time", "4-concurrent-per-replica"])
def test_replicas_lose_nothing_through_rasas_factory(
    tmp_path: Path, redis_server: RedisProcess, tasks: int
) -> None:
    # The workload (two replicas, 200 messages each, one at a time),
    # and the same with four messages in flight per replica, as a Rasa
    # server handling several requests at once has.
    key_prefix = prefix()
    path = write_endpoints(
        tmp_path, type=ADAPTER, host=redis_server.host, port=redis_server.port, db=0, key_prefix=key_prefix
    )
    outcome = run_replicas(
        path,
        counter_url=redis_server.url(),
        counter_key="counter:rasa",
        processes=2,
        messages=200,
        tasks=tasks,
    )
    assert_flawless(outcome, processes=2)
    assert keys_with_prefix(redis_server, key_prefix) == []


@pytest.mark.slow
def test_replicas_through_rasas_factory_on_sentinel(
    tmp_path: Path, redis_sentinel: SentinelSetup, redis_server: RedisProcess
) -> None:
    key_prefix = prefix()
    path = write_endpoints(
        tmp_path,
        type=ADAPTER,
        deployment_mode="sentinel",
        endpoints=redis_sentinel.endpoints(),
        sentinel_service=redis_sentinel.service,
        db=0,
        key_prefix=key_prefix,
    )
    # The counter lives on a plain server; the locks live behind Sentinel.
    outcome = run_replicas(path, counter_url=redis_server.url(), counter_key="counter:sentinel", messages=60)
    assert_flawless(outcome, processes=2)
    assert keys_with_prefix(redis_sentinel.master, key_prefix) == []


@pytest.mark.slow
def test_replicas_through_rasas_factory_over_tls(
    tmp_path: Path, redis_tls: RedisProcess, redis_server: RedisProcess
) -> None:
    files = redis_tls.tls_files
    assert files is not None
    key_prefix = prefix()
    path = write_endpoints(
        tmp_path,
        type=ADAPTER,
        host=redis_tls.host,
        port=redis_tls.port,
        db=0,
        use_ssl=True,
        ssl_ca_certs=str(files.ca_cert),
        ssl_certfile=str(files.client_cert),
        ssl_keyfile=str(files.client_key),
        key_prefix=key_prefix,
    )
    outcome = run_replicas(path, counter_url=redis_server.url(), counter_key="counter:tls", messages=60)
    assert_flawless(outcome, processes=2)
    assert keys_with_prefix(redis_tls, key_prefix) == []


# -- the comparison: Rasa's own stores on the same workload

COMPARISON_DEADLINE = 6.0  # Rasa's `redis` store can stall for a whole 60 s lock lifetime; 6 s shows the stall


@pytest.mark.slow
def test_rasas_own_stores_on_the_same_workload(
    tmp_path: Path, redis_server: RedisProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """Prints what each store loses; asserts only that the workload ran (and convlock's result)."""
    common = {"host": redis_server.host, "port": redis_server.port, "db": 0}
    rows = []
    for kind in (ADAPTER, "redis", "concurrent_redis"):
        path = write_endpoints(tmp_path, type=kind, key_prefix=prefix(), **common)
        outcome = run_replicas(
            path,
            counter_url=redis_server.url(),
            counter_key=f"counter:{kind}",
            processes=2,
            messages=200,
            deadline=COMPARISON_DEADLINE,
        )
        assert outcome.errors == (), outcome.errors
        assert outcome.completed + outcome.lock_errors + outcome.unfinished == outcome.messages
        rows.append((kind.rpartition(".")[2], outcome))
    with capsys.disabled():
        print(
            f"\nRasa workload: 2 processes x 200 messages on one conversation (cut off after {COMPARISON_DEADLINE:g}s)"
        )
        for name, outcome in rows:
            print(f"  {name:<18} {outcome.summary()}")
    assert_flawless(rows[0][1], processes=2)
