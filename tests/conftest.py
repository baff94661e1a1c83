"""Shared fixtures: real redis-server processes on free loopback ports.

The logic lives in ``redis_procs.py``; these fixtures only tie process life
times to pytest scopes. No fixture ever touches the Redis on port 6379.
Setups that the binary cannot run (e.g. TLS on a build without it) skip with
the reason; any other start failure is an error, with the server's log tail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

import redis_procs
from redis_procs import ClusterSetup, RedisProcess, RedisUnsupported, SentinelSetup

T = TypeVar("T")


def _start_or_skip(start: Callable[[], T]) -> T:
    """Run a setup; skip (with the binary's reason) when it cannot run it, fail on anything else."""
    try:
        return start()
    except RedisUnsupported as exc:
        pytest.skip(exc.reason)


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """The redis-server binary the fixtures run (``$CONVLOCK_REDIS_SERVER`` or ``PATH``)."""
    return redis_procs.find_redis_server()


@pytest.fixture(scope="session")
def redis_server_session(
    tmp_path_factory: pytest.TempPathFactory, redis_binary: str
) -> Iterator[RedisProcess]:
    """One plain redis-server (no auth, no TLS) shared by the whole session.

    Tests should take :func:`redis_server` instead, which empties it first.
    """
    proc = redis_procs.start_redis(tmp_path_factory.mktemp("redis-shared"), binary=redis_binary)
    yield proc
    proc.stop()


@pytest.fixture
def redis_server(redis_server_session: RedisProcess) -> RedisProcess:
    """The session's shared redis-server, running and emptied (FLUSHALL) for this test.

    Shared, so do not stop, kill or reconfigure it: use :func:`fresh_redis`
    for that. Should an earlier test have stopped it anyway, it is started
    again on the same port.
    """
    if not redis_server_session.alive:
        redis_server_session.start()
    redis_server_session.command("FLUSHALL")
    return redis_server_session


@pytest.fixture
def fresh_redis(tmp_path: Path, redis_binary: str) -> Iterator[RedisProcess]:
    """A brand-new, empty redis-server for this test alone, stopped afterwards.

    The test may ``stop()``, ``kill()``, ``restart()`` (same port, new pid,
    empty data) or reconfigure it freely.
    """
    proc = redis_procs.start_redis(tmp_path, binary=redis_binary)
    yield proc
    # kill() rather than stop(): nothing is persisted, and SIGTERM would cost
    # up to 100 ms per test waiting for the server's next cron tick.
    proc.kill()


@pytest.fixture(scope="session")
def redis_tls(tmp_path_factory: pytest.TempPathFactory, redis_binary: str) -> Iterator[RedisProcess]:
    """A TLS-only redis-server shared by the session; ``.tls_files`` holds the PEM files.

    Plain text is closed (``port 0``); ``.port`` is the TLS port and
    ``.url()`` a ``rediss://`` URL. The server certificate names ``localhost``
    and ``127.0.0.1`` and is signed by ``.tls_files.ca_cert``. Client
    certificates are optional (``tls-auth-clients optional``): a client that
    only verifies the server gets in, one presenting ``.tls_files.client_cert``
    too, one presenting a certificate from another CA is refused.
    ``.client_kwargs()`` presents the client certificate. Not flushed between
    tests: use your own keys. Skips when no certificates can be made or the
    binary has no TLS.
    """
    folder = tmp_path_factory.mktemp("redis-tls")
    files = _start_or_skip(lambda: redis_procs.make_tls_files(folder / "certs"))
    proc = _start_or_skip(lambda: redis_procs.start_redis(folder, tls=files, binary=redis_binary))
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def redis_acl(tmp_path_factory: pytest.TempPathFactory, redis_binary: str) -> Iterator[RedisProcess]:
    """A redis-server shared by the session that only lets in ACL user ``convlock``.

    ``.username``/``.password`` are ``redis_procs.ACL_USERNAME``/``ACL_PASSWORD``;
    that user may run every command on every key and channel. The default
    user is off, so a client that sends only a password (or none) is
    refused. ``.url(credentials=True)`` carries the credentials. Not flushed
    between tests: use your own keys. Skips on a binary older than 6.0.
    """
    proc = _start_or_skip(
        lambda: redis_procs.start_redis(
            tmp_path_factory.mktemp("redis-acl"),
            username=redis_procs.ACL_USERNAME,
            password=redis_procs.ACL_PASSWORD,
            binary=redis_binary,
        )
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory, redis_binary: str) -> Iterator[SentinelSetup]:
    """A master with one in-sync replica and one sentinel monitoring it as ``"mymaster"`` (quorum 1).

    ``.endpoints()`` lists the sentinel as ``"127.0.0.1:PORT"``; ``.master``,
    ``.replicas`` and ``.sentinels`` are the processes. Shared by the
    session and not flushed: use your own keys (or ``.master.command("FLUSHALL")``),
    and do not stop or fail over its processes; start a private setup with
    ``redis_procs.start_sentinel_setup(tmp_path, down_after_ms=...)`` for
    that.
    """
    setup = _start_or_skip(
        lambda: redis_procs.start_sentinel_setup(
            tmp_path_factory.mktemp("redis-sentinel"), binary=redis_binary
        )
    )
    yield setup
    setup.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory, redis_binary: str) -> Iterator[ClusterSetup]:
    """A three-master Redis Cluster on loopback with all 16384 slots assigned and ``cluster_state:ok``.

    ``.endpoints()`` lists the nodes as ``"127.0.0.1:PORT"``; ``.nodes[i]``
    serves slots ``.slot_ranges[i]`` (0-5460, 5461-10922, 10923-16383);
    ``.node_for_key(key)`` names the node that holds a key. No replicas.
    Shared by the session and not flushed: use your own keys or call
    ``.flush()``, and do not stop its nodes; call
    ``redis_procs.start_cluster(tmp_path)`` for a private one.
    """
    setup = _start_or_skip(
        lambda: redis_procs.start_cluster(tmp_path_factory.mktemp("redis-cluster"), binary=redis_binary)
    )
    yield setup
    setup.stop()
