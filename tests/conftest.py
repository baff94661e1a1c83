"""Shared fixtures: real redis-server processes on free loopback ports.

The logic lives in ``redis_procs.py``; these fixtures only tie process life
times to pytest scopes. No fixture ever touches the Redis on port 6379.
Setups that the binary cannot run (e.g. TLS on a build without it) skip with
the reason; any other start failure is an error, with the server's log tail.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import redis_procs
from redis_procs import RedisProcess


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
    proc.stop()
