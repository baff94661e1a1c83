"""The redis-server fixtures really start servers that behave as promised."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.exceptions
import redis.sentinel
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

import redis_procs
from redis_procs import ClusterSetup, RedisProcess, RedisStartError, SentinelSetup

# redis-py leaves these unannotated; as Any they can be called under mypy --strict.
Sentinel: Any = redis.sentinel.Sentinel
AsyncSentinel: Any = redis.asyncio.sentinel.Sentinel
ClusterNode: Any = redis.cluster.ClusterNode


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# --------------------------------------------------------------------------
# binary, version, ports


def test_find_redis_server_honours_the_environment(
    monkeypatch: pytest.MonkeyPatch, redis_binary: str, tmp_path: Path
) -> None:
    monkeypatch.setenv(redis_procs.REDIS_SERVER_ENV, redis_binary)
    assert redis_procs.find_redis_server() == str(Path(redis_binary).resolve())
    monkeypatch.setenv(redis_procs.REDIS_SERVER_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="not an executable"):
        redis_procs.find_redis_server()


def test_version_of_binary_matches_info_server(redis_server: RedisProcess) -> None:
    from_binary = redis_procs.redis_version(redis_server.binary)
    assert from_binary >= (5, 0, 0)
    assert redis_server.version() == from_binary
    assert redis_server.info("server")["redis_version"] == ".".join(map(str, from_binary))


def test_version_skip_reason_names_feature_binary_and_versions(redis_binary: str) -> None:
    assert redis_procs.version_skip_reason((1, 0, 0), "anything", redis_binary) is None
    reason = redis_procs.version_skip_reason((99, 0, 0), "time travel", redis_binary)
    assert reason is not None
    assert "time travel needs redis-server >= 99.0.0" in reason
    assert redis_binary in reason


def test_skip_if_redis_older_marks_only_what_the_binary_lacks(redis_binary: str) -> None:
    lacking = redis_procs.skip_if_redis_older((99, 0, 0), "time travel")
    assert lacking.args == (True,)
    assert lacking.kwargs["reason"].startswith("time travel needs redis-server >= 99.0.0, but ")
    assert redis_procs.skip_if_redis_older((1, 0, 0), "PING").args == (False,)


def test_free_port_is_bindable_unique_and_never_6379() -> None:
    ports = [redis_procs.free_port() for _ in range(20)]
    assert len(set(ports)) == len(ports)
    assert redis_procs.FOREIGN_PORT not in ports
    for port in ports[:3]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_free_port_with_bus_leaves_port_plus_10000_free() -> None:
    port = redis_procs.free_port(bus=True)
    assert port + 10000 <= 65535
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", port))
        b.bind(("127.0.0.1", port + 10000))


def test_start_redis_refuses_6379(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="6379"):
        redis_procs.start_redis(tmp_path, port=6379)


# --------------------------------------------------------------------------
# redis_server (shared, flushed)


def test_redis_server_answers_ping_set_get(redis_server: RedisProcess) -> None:
    assert redis_server.port != redis_procs.FOREIGN_PORT
    assert redis_server.url() == f"redis://127.0.0.1:{redis_server.port}"
    assert redis_server.command("PING") is True
    assert redis_server.command("SET", "convlock:probe", "v") is True
    assert redis_server.command("GET", "convlock:probe") == "v"
    redis_server.command("SET", "convlock:leftover", "1")


def test_redis_server_is_flushed_before_each_test(redis_server: RedisProcess) -> None:
    # The test above left a key behind; the fixture must have removed it.
    assert redis_server.command("DBSIZE") == 0


def test_redis_server_is_our_process_in_our_folder(redis_server: RedisProcess) -> None:
    server = redis_server.info("server")
    assert server["process_id"] == str(redis_server.pid)
    assert server["tcp_port"] == str(redis_server.port)
    assert redis_server.command("CONFIG", "GET", "dir")["dir"] == str(redis_server.dir)
    assert redis_server.command("CONFIG", "GET", "save")["save"] == ""
    assert redis_server.command("CONFIG", "GET", "appendonly")["appendonly"] == "no"
    assert redis_server.log_path.is_file()


def test_command_supports_assertion_helpers(redis_server: RedisProcess) -> None:
    assert redis_server.command("CONFIG", "RESETSTAT") == "OK"
    redis_server.command("SET", "a", "1")
    stats = redis_server.command("INFO", "commandstats")
    assert stats["cmdstat_set"]["calls"] == 1
    cursor, keys = redis_server.command("SCAN", 0, "MATCH", "*", "COUNT", 100)
    assert keys == ["a"]
    assert int(cursor) == 0


async def test_async_client_reaches_redis_server(redis_server: RedisProcess) -> None:
    client = redis.asyncio.Redis.from_url(redis_server.url(), decode_responses=True)
    try:
        await client.set("k", "v")
        assert await client.get("k") == "v"
    finally:
        await client.aclose()


# --------------------------------------------------------------------------
# fresh_redis (private, may be restarted and killed)


def test_fresh_redis_is_separate_from_the_shared_one(
    fresh_redis: RedisProcess, redis_server: RedisProcess
) -> None:
    assert fresh_redis.port != redis_server.port
    fresh_redis.command("SET", "only-here", "1")
    assert redis_server.command("EXISTS", "only-here") == 0


def test_fresh_redis_restart_keeps_port_and_comes_back_empty(fresh_redis: RedisProcess) -> None:
    port, old_pid = fresh_redis.port, fresh_redis.pid
    fresh_redis.command("SET", "k", "v")
    fresh_redis.restart()
    assert fresh_redis.port == port
    assert fresh_redis.pid != old_pid
    assert not _pid_alive(old_pid)
    assert fresh_redis.command("PING") is True
    assert fresh_redis.command("DBSIZE") == 0


def test_fresh_redis_kill_then_restart(fresh_redis: RedisProcess) -> None:
    old_pid = fresh_redis.pid
    fresh_redis.kill()
    assert not fresh_redis.alive
    assert not _pid_alive(old_pid)
    with pytest.raises(redis.ConnectionError):
        fresh_redis.command("PING")
    fresh_redis.kill()  # idempotent
    fresh_redis.restart()
    assert fresh_redis.command("PING") is True


def test_stop_is_idempotent(fresh_redis: RedisProcess) -> None:
    pid = fresh_redis.pid
    fresh_redis.stop()
    fresh_redis.stop()
    assert not _pid_alive(pid)
    fresh_redis.start()
    assert fresh_redis.command("PING") is True


def test_explicit_busy_port_fails_with_log_tail(fresh_redis: RedisProcess, tmp_path: Path) -> None:
    with pytest.raises(RedisStartError, match="Address already in use") as caught:
        redis_procs.start_redis(tmp_path / "clash", port=fresh_redis.port, timeout=5)
    assert caught.value.address_in_use


def test_failed_restart_reports_only_its_own_log(fresh_redis: RedisProcess, tmp_path: Path) -> None:
    clash = redis_procs.start_redis(tmp_path / "clash")
    try:
        fresh_redis.stop()
        fresh_redis.argv += ["--no-such-directive", "x"]
        with pytest.raises(RedisStartError) as caught:
            fresh_redis.start(timeout=5)
        assert "no-such-directive" in caught.value.log_tail
        assert not caught.value.address_in_use
        # A second failure, for another reason, must not be blamed on the first.
        fresh_redis.argv[fresh_redis.argv.index("--no-such-directive") :] = ["--port", str(clash.port)]
        with pytest.raises(RedisStartError) as caught:
            fresh_redis.start(timeout=0.5)
        assert caught.value.address_in_use
        assert "no-such-directive" not in caught.value.log_tail
    finally:
        clash.stop()


def test_auto_port_retries_when_the_port_is_taken(
    monkeypatch: pytest.MonkeyPatch, fresh_redis: RedisProcess, tmp_path: Path
) -> None:
    # The first port offered is already taken by fresh_redis; start_redis must
    # notice "Address already in use" and try the next one.
    offered = iter([fresh_redis.port])
    real_free_port = redis_procs.free_port

    def first_busy_then_free(*, bus: bool = False) -> int:
        return next(offered, None) or real_free_port(bus=bus)

    monkeypatch.setattr(redis_procs, "free_port", first_busy_then_free)
    proc = redis_procs.start_redis(tmp_path)
    try:
        assert proc.port != fresh_redis.port
        assert proc.command("PING") is True
    finally:
        proc.stop()


def test_atexit_kills_servers_a_crashed_test_left_running(tmp_path: Path) -> None:
    # A child interpreter starts a server and exits without stopping it, as
    # a session that dies in the middle would; the server must not outlive it.
    child_script = tmp_path / "child.py"
    child_script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            import redis_procs
            proc = redis_procs.start_redis(__import__("pathlib").Path({str(tmp_path)!r}))
            print(proc.pid, flush=True)
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(child_script)], capture_output=True, text=True, timeout=30, check=True
    )
    pid = int(out.stdout.split()[0])
    assert not _pid_alive(pid)


# --------------------------------------------------------------------------
# TLS


def test_tls_files_verify_for_localhost_and_loopback_ip(redis_tls: RedisProcess) -> None:
    files = redis_tls.tls_files
    assert files is not None
    context = ssl.create_default_context(cafile=str(files.ca_cert))
    context.load_cert_chain(str(files.client_cert), str(files.client_key))
    for name in ("localhost", "127.0.0.1"):
        with (
            socket.create_connection(("127.0.0.1", redis_tls.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=name) as tls,
        ):
            tls.sendall(b"PING\r\n")
            assert tls.recv(64) == b"+PONG\r\n"


def test_tls_redis_works_over_tls_with_client_cert(redis_tls: RedisProcess) -> None:
    assert redis_tls.tls
    assert redis_tls.url() == f"rediss://127.0.0.1:{redis_tls.port}"
    assert redis_tls.command("SET", "tls:probe", "v") is True
    assert redis_tls.command("GET", "tls:probe") == "v"
    assert redis_tls.command("CONFIG", "GET", "port")["port"] == "0"


async def test_tls_redis_works_with_only_the_ca(redis_tls: RedisProcess) -> None:
    assert redis_tls.tls_files is not None
    client = redis.asyncio.Redis.from_url(redis_tls.url(), ssl_ca_certs=str(redis_tls.tls_files.ca_cert))
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()


def test_tls_redis_refuses_plain_text(redis_tls: RedisProcess) -> None:
    plain = redis.Redis(host="127.0.0.1", port=redis_tls.port, socket_timeout=5, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.ConnectionError), plain:
        plain.ping()


def test_tls_redis_refuses_unverified_server_and_foreign_client_cert(
    redis_tls: RedisProcess, tmp_path: Path
) -> None:
    other = redis_procs.make_tls_files(tmp_path / "other-ca")
    no_retry = Retry(NoBackoff(), 0)
    # The client does not trust a server signed by a CA it does not know...
    distrustful = redis.Redis(
        host="127.0.0.1", port=redis_tls.port, ssl=True, ssl_ca_certs=str(other.ca_cert), retry=no_retry
    )
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"), distrustful:
        distrustful.ping()
    assert redis_tls.tls_files is not None
    # ...and the server does not accept a client certificate from one.
    foreign = redis.Redis(
        host="127.0.0.1",
        port=redis_tls.port,
        ssl=True,
        ssl_ca_certs=str(redis_tls.tls_files.ca_cert),
        ssl_certfile=str(other.client_cert),
        ssl_keyfile=str(other.client_key),
        retry=no_retry,
    )
    with pytest.raises(redis.ConnectionError), foreign:
        foreign.ping()


# --------------------------------------------------------------------------
# ACL


def test_acl_user_gets_in(redis_acl: RedisProcess) -> None:
    assert redis_acl.username == redis_procs.ACL_USERNAME
    assert redis_acl.command("ACL", "WHOAMI") == redis_procs.ACL_USERNAME
    assert redis_acl.command("SET", "acl:probe", "v") is True
    with redis.Redis.from_url(redis_acl.url(credentials=True), decode_responses=True) as client:
        assert client.get("acl:probe") == "v"


async def test_acl_user_gets_in_with_async_client(redis_acl: RedisProcess) -> None:
    client = redis.asyncio.Redis(
        host="127.0.0.1", port=redis_acl.port, username=redis_acl.username, password=redis_acl.password
    )
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("username", "password"),
    [
        (redis_procs.ACL_USERNAME, "wrong-password"),
        (None, redis_procs.ACL_PASSWORD),  # the default user is off
        ("nobody", redis_procs.ACL_PASSWORD),
    ],
)
def test_acl_refuses_wrong_credentials(redis_acl: RedisProcess, username: str | None, password: str) -> None:
    client = redis.Redis(
        host="127.0.0.1",
        port=redis_acl.port,
        username=username,
        password=password,
        retry=Retry(NoBackoff(), 0),
    )
    with pytest.raises(redis.AuthenticationError), client:
        client.ping()


def test_acl_refuses_clients_without_credentials(redis_acl: RedisProcess) -> None:
    client = redis.Redis(host="127.0.0.1", port=redis_acl.port, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.AuthenticationError), client:
        client.ping()


def test_requirepass_server(tmp_path: Path) -> None:
    proc = redis_procs.start_redis(tmp_path, password="sesame")
    try:
        assert proc.command("PING") is True
        assert proc.url(credentials=True) == f"redis://:sesame@127.0.0.1:{proc.port}"
        with (
            pytest.raises(redis.AuthenticationError),
            redis.Redis(port=proc.port, password="nope", retry=Retry(NoBackoff(), 0)) as bad,
        ):
            bad.ping()
    finally:
        proc.stop()


# --------------------------------------------------------------------------
# Sentinel


def test_sentinel_names_the_master(redis_sentinel: SentinelSetup) -> None:
    assert redis_sentinel.service == "mymaster"
    assert redis_sentinel.endpoints() == [f"127.0.0.1:{s.port}" for s in redis_sentinel.sentinels]
    sentinel = Sentinel(redis_sentinel.sentinel_addresses(), socket_timeout=5)
    assert sentinel.discover_master("mymaster") == ("127.0.0.1", redis_sentinel.master.port)
    assert sentinel.discover_slaves("mymaster") == [("127.0.0.1", r.port) for r in redis_sentinel.replicas]
    assert redis_sentinel.sentinels[0].command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster") == [
        "127.0.0.1",
        str(redis_sentinel.master.port),
    ]


def test_sentinel_master_takes_writes_and_replicates_them(redis_sentinel: SentinelSetup) -> None:
    sentinel = Sentinel(redis_sentinel.sentinel_addresses(), socket_timeout=5)
    master = sentinel.master_for("mymaster", decode_responses=True)
    master.set("sentinel:probe", "v")
    assert master.get("sentinel:probe") == "v"
    assert master.execute_command("WAIT", 1, 5000) == 1
    [replica] = redis_sentinel.replicas
    assert replica.command("GET", "sentinel:probe") == "v"


async def test_sentinel_works_with_the_async_client(redis_sentinel: SentinelSetup) -> None:
    sentinel = AsyncSentinel(redis_sentinel.sentinel_addresses(), socket_timeout=5)
    assert await sentinel.discover_master("mymaster") == ("127.0.0.1", redis_sentinel.master.port)
    master = sentinel.master_for("mymaster", decode_responses=True)
    try:
        await master.set("sentinel:async", "v")
        assert await master.get("sentinel:async") == "v"
    finally:
        await master.aclose()


@pytest.mark.slow
def test_private_sentinel_setup_fails_over_when_the_master_dies(tmp_path: Path) -> None:
    setup = redis_procs.start_sentinel_setup(tmp_path, service="failover", sentinels=1, down_after_ms=500)
    try:
        sentinel = Sentinel(setup.sentinel_addresses(), socket_timeout=2)
        [replica] = setup.replicas

        def current_master() -> tuple[str, int] | None:
            try:
                return tuple(sentinel.discover_master("failover"))
            except redis.sentinel.MasterNotFoundError:  # while the master is down, before promotion
                return None

        setup.master.kill()
        deadline = time.monotonic() + 20
        while current_master() != ("127.0.0.1", replica.port):
            assert time.monotonic() < deadline, "no failover within 20 s"
            time.sleep(0.1)
        assert replica.info("replication")["role"] == "master"
    finally:
        setup.stop()


# --------------------------------------------------------------------------
# Cluster


def _key_in_slot_range(first: int, last: int) -> str:
    for i in range(100_000):
        key = f"convlock-probe:{i}"
        if first <= key_slot(key.encode()) <= last:
            return key
    raise AssertionError(f"no key hashes into {first}..{last}")


def test_cluster_is_ok_with_every_slot_assigned(redis_cluster: ClusterSetup) -> None:
    assert len(redis_cluster.nodes) == 3
    assert redis_cluster.slot_ranges == [(0, 5460), (5461, 10922), (10923, 16383)]
    for node in redis_cluster.nodes:
        info = node.cluster_info()
        assert info["cluster_state"] == "ok"
        assert int(info["cluster_slots_assigned"]) == redis_procs.CLUSTER_SLOTS
        assert int(info["cluster_known_nodes"]) == 3
    slots = sorted(redis_cluster.nodes[0].command("CLUSTER", "SLOTS"))
    assert [(first, last, host, port) for first, last, [host, port, *_], *_ in slots] == [
        (first, last, "127.0.0.1", node.port)
        for node, (first, last) in zip(redis_cluster.nodes, redis_cluster.slot_ranges, strict=True)
    ]


def test_cluster_serves_a_key_in_each_slot_range(redis_cluster: ClusterSetup) -> None:
    client = redis.cluster.RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", redis_cluster.nodes[0].port)],
        decode_responses=True,
    )
    try:
        for node, (first, last) in zip(redis_cluster.nodes, redis_cluster.slot_ranges, strict=True):
            key = _key_in_slot_range(first, last)
            assert redis_cluster.node_for_key(key) is node
            assert client.set(key, node.endpoint) is True
            assert client.get(key) == node.endpoint
            # Only the owner holds it: the key really landed in that node's range.
            assert node.command("GET", key) == node.endpoint
            for other in redis_cluster.nodes:
                if other is not node:
                    with pytest.raises(redis.exceptions.MovedError):
                        other.command("GET", key)
    finally:
        client.close()


async def test_cluster_works_with_the_async_client(redis_cluster: ClusterSetup) -> None:
    host, port = redis_cluster.endpoints()[1].split(":")
    client = redis.asyncio.cluster.RedisCluster(host=host, port=int(port), decode_responses=True)
    try:
        for first, last in redis_cluster.slot_ranges:
            key = _key_in_slot_range(first, last)
            await client.set(key, "async")
            assert await client.get(key) == "async"
    finally:
        await client.aclose()


@pytest.mark.slow
def test_cluster_node_restart_rejoins_with_its_slots(tmp_path: Path) -> None:
    setup = redis_procs.start_cluster(tmp_path)
    try:
        node = setup.nodes[1]
        node_id = node.command("CLUSTER", "MYID")
        node.restart()
        assert node.command("CLUSTER", "MYID") == node_id
        setup.wait_ok()
        key = _key_in_slot_range(*setup.slot_ranges[1])
        assert node.command("SET", key, "back") is True
    finally:
        setup.stop()
