"""``convlock check-config``: every block validated, every Redis reached, the problem named by its key."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from convlock.cli import main
from redis_procs import ClusterSetup, RedisProcess, SentinelSetup, free_port


def check(path: Path, *args: str) -> tuple[int, str]:
    """Run ``convlock check-config PATH ARGS`` in this process; the status and everything printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(["check-config", str(path), *args])
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    return code, out.getvalue()


def write(path: Path, config: dict[str, Any]) -> Path:
    file = path / "endpoints.yml"
    file.write_text(yaml.safe_dump(config), encoding="utf-8")
    return file


def redis_block(redis: RedisProcess, **extra: Any) -> dict[str, Any]:
    return {"type": "redis", "url": redis.host, "port": redis.port, "db": 0, "socket_timeout": 2, **extra}


def test_a_good_file_reports_version_mode_tls_and_round_trip(redis_server: RedisProcess, tmp_path: Path) -> None:
    config = {
        "lock_store": redis_block(redis_server, lifetime=30),
        "tracker_store": redis_block(redis_server),
        "action_endpoint": {"url": "http://localhost:5055/webhook"},
    }
    code, out = check(write(tmp_path, config))
    assert code == 0, out
    version = redis_server.command("INFO", "server")["redis_version"]
    assert out.count(f"Redis {version}, mode standalone, TLS off, round trip ") == 2
    assert "lock scripts ok" in out
    assert f"Redis at 127.0.0.1:{redis_server.port} (db 0)" in out
    assert "section 'action_endpoint' is not used by convlock" in out
    assert out.rstrip().endswith("endpoints.yml: ok")
    assert redis_server.command("DBSIZE") == 0, "checking writes nothing"

    code, out = check(write(tmp_path, config), "--json")
    report = json.loads(out)
    assert code == 0
    assert report["ok"] is True
    lock = report["blocks"][0]
    assert lock["section"] == "lock_store"
    assert lock["redis"]["version"] == version
    assert lock["redis"]["mode"] == "standalone"
    assert lock["redis"]["tls"] is False
    assert lock["redis"]["round_trip_ms"] > 0


@pytest.mark.parametrize(("config", "messages"), [
    ({"lock_store": {"type": "redis", "port": "abc"}}, ["lock_store.port: got 'abc'"]),
    ({"lock_store": {"type": "redis", "port": 70000}, "tracker_store": {"type": "redis", "db": -1}},
     ["lock_store.port: got 70000", "tracker_store.db: got -1"]),
    ({"lock_store": {"type": "redis", "deployment_mode": "galaxy"}}, ["lock_store.deployment_mode: got 'galaxy'"]),
    ({"lock_store": {"type": "mongo"}}, ["lock_store.type: got 'mongo'"]),
    ({"lock_store": {"type": "redis", "lifetime": -5}}, ["lock_store.lifetime: got -5"]),
    ({"lock_store": {"type": "redis", "endpoints": ["nohost"]}}, ["lock_store.endpoints"]),
    ({"tracker_store": {"type": "no_such_module.Store"}}, ["tracker_store.type: cannot import module 'no_such_module'"]),
    ({"lock_store": {"type": "redis", "url": "redis://:pw-in-url@host"}}, ["lock_store.url", "not a URL"]),
])
def test_a_bad_file_names_every_bad_key_and_exits_2(
    tmp_path: Path, config: dict[str, Any], messages: list[str]
) -> None:
    code, out = check(write(tmp_path, config))
    assert code == 2
    for message in messages:
        assert message in out
    assert "INVALID" in out
    assert "Traceback" not in out
    assert "pw-in-url" not in out


def test_unknown_keys_are_warnings_not_errors(tmp_path: Path) -> None:
    code, out = check(write(tmp_path, {"lock_store": {"type": "in_memory", "lifetme": 5}}), "--no-connect")
    assert code == 0
    assert "warning: lock_store: unknown key 'lifetme' is ignored; check its spelling" in out


def test_file_level_problems(tmp_path: Path) -> None:
    code, out = check(tmp_path / "nope.yml")
    assert code == 2
    assert "'nope.yml' does not exist" in out.replace(str(tmp_path) + "/", "")
    bad = tmp_path / "bad.yml"
    bad.write_text("lock_store: [unclosed\n", encoding="utf-8")
    code, out = check(bad)
    assert code == 2
    assert "is not valid YAML" in out
    env = tmp_path / "env.yml"
    env.write_text("lock_store:\n  type: redis\n  port: ${CONVLOCK_TEST_UNSET_PORT}\n", encoding="utf-8")
    code, out = check(env)
    assert code == 2
    assert "lock_store.port: environment variable CONVLOCK_TEST_UNSET_PORT is not set" in out


def test_an_unreachable_redis_is_named_and_exits_2(tmp_path: Path) -> None:
    port = free_port()
    config = {"lock_store": {"type": "redis", "url": "127.0.0.1", "port": port, "socket_timeout": 1}}
    code, out = check(write(tmp_path, config))
    assert code == 2
    assert f"lock_store: cannot reach Redis at 127.0.0.1:{port} (db 1)" in out
    assert "Traceback" not in out


def test_tls_is_reported_on(redis_tls: RedisProcess, tmp_path: Path) -> None:
    assert redis_tls.tls_files is not None
    config = {"lock_store": redis_block(redis_tls, use_ssl=True, ssl_ca_certs=str(redis_tls.tls_files.ca_cert))}
    code, out = check(write(tmp_path, config))
    assert code == 0, out
    assert "mode standalone, TLS on, round trip" in out


@pytest.mark.slow
def test_sentinel_and_cluster_modes(
    redis_sentinel: SentinelSetup, redis_cluster: ClusterSetup, tmp_path: Path
) -> None:
    sentinel = {"type": "redis", "deployment_mode": "sentinel", "endpoints": redis_sentinel.endpoints(),
                "sentinel_service": "mymaster", "db": 0, "socket_timeout": 2}
    cluster = {"type": "redis", "deployment_mode": "cluster", "endpoints": redis_cluster.endpoints(),
               "socket_timeout": 2}
    code, out = check(write(tmp_path, {"lock_store": sentinel, "tracker_store": cluster}), "--json")
    assert code == 0, out
    lock, tracker = json.loads(out)["blocks"]
    assert lock["redis"]["mode"] == "Sentinel"
    assert lock["redis"]["target"].startswith("Redis Sentinel service 'mymaster' via ")
    assert tracker["redis"]["mode"] == "Cluster"
    assert tracker["redis"]["server_mode"] == "cluster"
    assert tracker["redis"]["nodes"] == 3


def test_a_standalone_setting_against_a_cluster_node_is_a_warning(
    redis_cluster: ClusterSetup, tmp_path: Path
) -> None:
    node = redis_cluster.nodes[0]
    code, out = check(write(tmp_path, {"lock_store": redis_block(node), "tracker_store": redis_block(node)}))
    assert "tracker_store.deployment_mode: the server is a Redis Cluster node" in out
    assert code == 0


@pytest.mark.parametrize(("config", "message"), [
    ({"tracker_store": {"type": "redis"}}, "lock_store.type: the in-memory lock store restarts its tickets"),
    ({"lock_store": {"type": "redis", "lifetime": 60}, "tracker_store": {"type": "redis", "expire_after": 100}},
     "tracker_store.expire_after: got 100"),
])
def test_blocks_valid_alone_but_not_together_are_refused_as_the_server_would(
    tmp_path: Path, config: dict[str, Any], message: str
) -> None:
    code, out = check(write(tmp_path, config), "--no-connect")
    assert code == 2
    assert message in out
