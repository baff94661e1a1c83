"""endpoints.yml: the spec's block, interpolation, custom classes and bad input."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from convlock import (
    ConfigError,
    InMemoryLockStore,
    LockStoreSettings,
    create_lock_store,
    load_endpoints,
)
from convlock.config import parse_settings

sys.path.insert(0, str(Path(__file__).parent))

SPEC_BLOCK = """
lock_store:
    type: "redis"
    url: redis.internal
    port: 6380
    password: s3cret
    db: 0
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "endpoints.yml"
    path.write_text(text, encoding="utf-8")
    return path


def settings_of(config: dict[str, object]) -> LockStoreSettings:
    return parse_settings(LockStoreSettings, config, section="lock_store")


def test_spec_example_block(tmp_path: Path) -> None:
    block = load_endpoints(write(tmp_path, SPEC_BLOCK))["lock_store"]
    settings = settings_of(block)
    assert (settings.type, settings.url, settings.port, settings.password, settings.db) == (
        "redis",
        "redis.internal",
        6380,
        "s3cret",
        0,
    )
    assert settings.use_ssl is False


def test_spec_defaults() -> None:
    settings = settings_of({"type": "redis"})
    assert settings.url == "localhost"
    assert settings.port == 6379
    assert settings.db == 1
    assert settings.password is None
    assert settings.use_ssl is False
    assert settings.socket_timeout == 10
    assert settings.deployment_mode == "standard"
    assert settings.sentinel_service == "mymaster"
    assert settings.key_prefix == "convlock"


def test_host_is_an_alias_of_url() -> None:
    assert settings_of({"host": "h1"}).url == "h1"
    with pytest.raises(ConfigError, match="not both"):
        settings_of({"host": "h1", "url": "h2"})


def test_interpolation_converts_strings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_PORT", "6390")
    monkeypatch.setenv("REDIS_SSL", "true")
    monkeypatch.setenv("REDIS_DB", "3")
    monkeypatch.setenv("SENTINELS", "s1:26379, s2:26379")
    path = write(
        tmp_path,
        """
lock_store:
  type: redis
  url: ${REDIS_HOST:-cache.local}
  port: ${REDIS_PORT}
  db: ${REDIS_DB}
  use_ssl: ${REDIS_SSL}
  password: ${REDIS_PASSWORD:-}
  deployment_mode: sentinel
  endpoints: ${SENTINELS}
  lifetime: "30"
""",
    )
    settings = settings_of(load_endpoints(path)["lock_store"])
    assert settings.url == "cache.local"
    assert settings.port == 6390
    assert settings.db == 3
    assert settings.use_ssl is True
    assert settings.password is None
    assert settings.endpoints == ["s1:26379", "s2:26379"]
    assert settings.addresses() == [("s1", 26379), ("s2", 26379)]
    assert settings.lifetime == 30


def test_unset_variable_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVLOCK_NOT_SET", raising=False)
    path = write(tmp_path, "lock_store:\n  type: redis\n  password: ${CONVLOCK_NOT_SET}\n")
    with pytest.raises(ConfigError, match=r"CONVLOCK_NOT_SET is not set.*lock_store\.password|lock_store\.password.*CONVLOCK_NOT_SET"):
        load_endpoints(path)


def test_interpolation_cannot_inject_structure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVIL", "x\nport: 1")
    data = load_endpoints(write(tmp_path, "lock_store:\n  url: ${EVIL}\n"))
    assert data == {"lock_store": {"url": "x\nport: 1"}}


def test_missing_empty_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_endpoints(tmp_path / "nope.yml")
    assert load_endpoints(write(tmp_path, "")) == {}
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_endpoints(write(tmp_path, "lock_store: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_endpoints(write(tmp_path, "- a list\n"))


def test_no_block_means_in_memory() -> None:
    store = create_lock_store(None)
    assert isinstance(store, InMemoryLockStore)
    assert isinstance(create_lock_store({"type": "in_memory", "lifetime": 5}), InMemoryLockStore)
    assert create_lock_store({"type": "in_memory", "lifetime": "5"}).lifetime == 5


def test_whole_file_round_trip(tmp_path: Path) -> None:
    path = write(tmp_path, "lock_store:\n  type: in_memory\n  wait_timeout: 2\n")
    store = create_lock_store(load_endpoints(path).get("lock_store"))
    assert isinstance(store, InMemoryLockStore)
    assert store.wait_timeout == 2


def test_custom_class_path_gets_the_other_keys() -> None:
    store = create_lock_store({"type": "custom_store.TaggedLockStore", "tag": "blue", "lifetime": 9})
    assert type(store).__name__ == "TaggedLockStore"
    assert store.tag == "blue"  # type: ignore[attr-defined]
    assert store.lifetime == 9


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"type": "custom_store.NotAStore"}, "not a subclass of convlock.store.LockStore"),
        ({"type": "no_such_module_xyz.Store"}, "cannot import module 'no_such_module_xyz'"),
        ({"type": "custom_store.TaggedLockStore"}, "does not accept these keys"),
        ({"type": "custom_store.TaggedLockStore", "tag": "x", "colour": 1}, "colour"),
        ({"type": "mongo"}, r"lock_store\.type: got 'mongo'; use 'in_memory', 'redis'"),
        ({"type": "redis", "port": "six"}, r"lock_store\.port: got 'six'"),
        ({"type": "redis", "port": 0}, r"lock_store\.port: got 0; input should be greater than or equal to 1"),
        ({"type": "redis", "db": -1}, r"lock_store\.db: got -1"),
        ({"type": "redis", "use_ssl": "maybe"}, r"lock_store\.use_ssl: got 'maybe'"),
        ({"type": "redis", "socket_timeout": 0}, r"lock_store\.socket_timeout"),
        ({"type": "redis", "deployment_mode": "mesh"}, r"lock_store\.deployment_mode: got 'mesh'.*'standard', 'sentinel' or 'cluster'"),
        ({"type": "redis", "endpoints": ["nohost"]}, r"lock_store\.endpoints: got \['nohost'\]; each endpoint must look like 'host:port'"),
        ({"type": "redis", "endpoints": ["h:99999"]}, "host:port"),
        ({"type": "redis", "ssl_ca_certs": "/no/such/ca.pem"}, r"lock_store\.ssl_ca_certs: got '/no/such/ca.pem'; no such file"),
        ({"type": "redis", "key_prefix": "a{b}"}, r"lock_store\.key_prefix.*braces"),
        ({"type": "in_memory", "lifetime": -3}, r"lock_store\.lifetime: got -3"),
        ({"type": "in_memory", "wait_timeout": "soon"}, r"lock_store\.wait_timeout: got 'soon'"),
        ({"type": 5}, r"lock_store\.type"),
        (["not", "a", "mapping"], "expected a mapping"),
    ],
)
def test_bad_values_name_the_key(config: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_lock_store(config)  # type: ignore[arg-type]


def test_unknown_keys_warn_by_name(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="convlock.config"):
        store = create_lock_store({"type": "in_memory", "lifetme": 5})
    assert isinstance(store, InMemoryLockStore)
    assert "unknown key 'lifetme'" in caplog.text
