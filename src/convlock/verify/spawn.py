"""A private redis-server for ``convlock verify --spawn-redis``.

The server listens on 127.0.0.1 on a free port (never 6379, which may belong
to a Redis that is not ours), keeps its files in a temporary folder and is
killed when verify ends. The binary is ``$CONVLOCK_REDIS_SERVER`` if set,
else ``redis-server`` on ``PATH``.

It runs with an append-only file (``appendfsync always``), so that the
``restart`` fault (SIGTERM, then start again on the same port) models a
durable Redis going down and coming back: acknowledged writes, leases
included, survive. Without persistence a restart would forget every lock at
once, which no lock on that Redis could survive; that case is the same as
an unsafe failover.

``--spawn-redis sentinel`` starts :class:`SpawnedSentinel` instead: a master,
a replica and three Sentinels, for the ``failover`` fault.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

__all__ = [
    "REDIS_SERVER_ENV",
    "SpawnError",
    "SpawnedRedis",
    "SpawnedSentinel",
    "find_redis_server",
    "free_port",
]

REDIS_SERVER_ENV = "CONVLOCK_REDIS_SERVER"
HOST = "127.0.0.1"
_READY_TIMEOUT = 10.0


class SpawnError(RuntimeError):
    """The private Redis could not be found or started; the message says what to do."""


def find_redis_server() -> str:
    """The redis-server to run: ``$CONVLOCK_REDIS_SERVER``, else ``redis-server`` on ``PATH``."""
    configured = os.environ.get(REDIS_SERVER_ENV, "").strip()
    if configured:
        path = Path(configured).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise SpawnError(f"${REDIS_SERVER_ENV}={configured!r} is not an executable file; fix or unset it")
        return str(path)
    found = shutil.which("redis-server")
    if found is None:
        raise SpawnError(
            f"--spawn-redis needs a redis-server binary: install one (Debian: apt-get install "
            f"redis-server) or set ${REDIS_SERVER_ENV}=/path/to/redis-server"
        )
    return found


def free_port() -> int:
    """A loopback port that is free now (the kernel's choice, so never 6379)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class SpawnedRedis:
    """One redis-server process that verify owns: :meth:`start`, :meth:`restart`, :meth:`kill`."""

    def __init__(
        self,
        directory: Path,
        *,
        binary: str | None = None,
        extra_args: tuple[str, ...] = (),
        sentinel_monitor: tuple[str, int, int] | None = None,
    ) -> None:
        self.binary = binary or find_redis_server()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._popen: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "redis.log"
        self.extra_args = extra_args
        #: (service, master port, quorum) for a sentinel; None for a data server.
        self.sentinel_monitor = sentinel_monitor

    @property
    def pid(self) -> int | None:
        """The running server's process ID."""
        return None if self._popen is None else self._popen.pid

    def _argv(self) -> list[str]:
        if self.sentinel_monitor is not None:
            config = self.directory / "sentinel.conf"
            if not config.exists():  # a sentinel rewrites its file: write it once
                service, master_port, quorum = self.sentinel_monitor
                config.write_text(
                    "\n".join(
                        [
                            f"port {self.port}",
                            f"bind {HOST}",
                            "daemonize no",
                            "protected-mode no",
                            f'dir "{self.directory}"',
                            f"sentinel monitor {service} {HOST} {master_port} {quorum}",
                            f"sentinel down-after-milliseconds {service} 2000",
                            f"sentinel failover-timeout {service} 6000",
                            f"sentinel parallel-syncs {service} 1",
                            "",
                        ]
                    )
                )
            return [self.binary, str(config), "--sentinel"]
        return [
            self.binary,
            "--bind", HOST,
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--protected-mode", "no",
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> None:
        """Start the server and wait until this very process answers; retry if the port was taken."""
        for attempt in range(5):
            with self.log_path.open("ab") as log:
                self._popen = subprocess.Popen(
                    self._argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )
            if self._wait_ready():
                return
            tail = self._log_tail()
            self.kill()
            if "Address already in use" in tail and attempt < 4:
                time.sleep(0.2)
                continue
            raise SpawnError(f"redis-server on port {self.port} did not start:\n{tail}")

    def _wait_ready(self) -> bool:
        popen = self._popen
        assert popen is not None
        deadline = time.monotonic() + _READY_TIMEOUT
        while time.monotonic() < deadline:
            if popen.poll() is not None:
                return False
            try:
                with redis.Redis(
                    host=HOST, port=self.port, socket_timeout=1, socket_connect_timeout=1
                ) as client:
                    info = client.info("server")
                    if int(info.get("process_id", -1)) == popen.pid and client.ping():
                        return True
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.02)
        return False

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM and wait: Redis finishes its append-only file before it exits."""
        popen = self._popen
        if popen is None or popen.poll() is not None:
            return
        popen.terminate()
        try:
            popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout=10)

    def restart(self, down_for: float = 0.0) -> None:
        """Stop, stay down for ``down_for`` seconds, and start again on the same port."""
        self.stop()
        time.sleep(down_for)
        self.start()

    def kill(self) -> None:
        """SIGKILL, for the end of the run (nothing of it is needed any more)."""
        popen = self._popen
        if popen is None or popen.poll() is not None:
            return
        with contextlib.suppress(OSError):
            popen.kill()
        popen.wait(timeout=10)


class SpawnedSentinel:
    """A master, one replica and three Sentinels (quorum 2) monitoring it as :data:`SERVICE`.

    :meth:`failover` forces a failover (``SENTINEL FAILOVER``) and returns once
    the promoted replica is master and the old master has been turned into its
    replica and is in sync, so that the next failover again has a replica to
    promote. Data servers replicate asynchronously, as Redis always does: a
    write the old master acknowledged just before a failover can be lost.
    """

    SERVICE = "verify"

    def __init__(self, directory: Path, *, binary: str | None = None) -> None:
        binary = binary or find_redis_server()
        # Set by kill(): a failover still running in its thread at the end of
        # the run gives up at once instead of polling killed servers for the
        # rest of its 20 + 30 s timeouts (which the interpreter's exit waits for).
        self._killed = threading.Event()
        sync = ("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0", "--appendonly", "no")
        self.master = SpawnedRedis(directory / "master", binary=binary, extra_args=sync)
        self.replica = SpawnedRedis(
            directory / "replica",
            binary=binary,
            extra_args=(*sync, "--replicaof", HOST, str(self.master.port)),
        )
        self.sentinels = [
            SpawnedRedis(
                directory / f"sentinel-{index}",
                binary=binary,
                sentinel_monitor=(self.SERVICE, self.master.port, 2),
            )
            for index in range(3)
        ]

    @property
    def processes(self) -> list[SpawnedRedis]:
        """Every process: sentinels first (so none fails the master over while the others stop)."""
        return [*self.sentinels, self.replica, self.master]

    def endpoints(self) -> list[str]:
        """The sentinels as ``127.0.0.1:PORT``."""
        return [f"{HOST}:{sentinel.port}" for sentinel in self.sentinels]

    def start(self) -> None:
        """Start everything and wait until the sentinels agree on the master and its replica."""
        self.master.start()
        self.replica.start()
        _wait(lambda: _replicas_online(self.master.port) >= 1, "the replica to sync", 20)
        for sentinel in self.sentinels:
            sentinel.start()

        def agreed() -> bool:
            for sentinel in self.sentinels:
                with _client(sentinel.port) as client:
                    state = client.execute_command("SENTINEL", "MASTER", self.SERVICE)
                if isinstance(state, list):
                    state = dict(zip(state[::2], state[1::2], strict=True))
                state = {_text(key): _text(value) for key, value in state.items()}
                if int(state.get("num-slaves", 0)) < 1 or int(state.get("num-other-sentinels", 0)) < 2:
                    return False
            return True

        _wait(agreed, "the sentinels to agree on the master and its replica", 30)

    def master_port(self) -> int:
        """The port of the master the sentinels name now."""
        with _client(self.sentinels[0].port) as client:
            _host, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)
        return int(port)

    def failover(self) -> None:
        """Force a failover and wait until the new master has an in-sync replica again."""
        old = self.master_port()
        deadline = time.monotonic() + 20
        while True:
            try:
                with _client(self.sentinels[0].port) as client:
                    client.execute_command("SENTINEL", "FAILOVER", self.SERVICE)
                break
            except redis.ResponseError:
                # INPROG or NOGOODSLAVE: an earlier failover is still settling.
                if time.monotonic() > deadline or self._killed.is_set():
                    raise
                time.sleep(0.2)
        _wait(lambda: self.master_port() != old, "the sentinels to promote the replica", 20, self._killed)
        new = self.master_port()
        _wait(lambda: _replicas_online(new) >= 1, "the old master to sync as a replica", 30, self._killed)

    def kill(self) -> None:
        """SIGKILL every process; a :meth:`failover` still waiting raises :class:`SpawnError` at once."""
        self._killed.set()
        for process in self.processes:
            process.kill()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _client(port: int) -> redis.Redis:
    return redis.Redis(host=HOST, port=port, socket_timeout=2, socket_connect_timeout=2)


def _replicas_online(port: int) -> int:
    with _client(port) as client:
        info = client.info("replication")
    if info.get("role") != "master":
        return 0
    return sum(1 for key, value in info.items() if key.startswith("slave") and "online" in str(value))


def _wait(
    predicate: Callable[[], bool], what: str, timeout: float, killed: threading.Event | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if killed is not None and killed.is_set():
            raise SpawnError(f"stopped waiting for {what}: the servers were killed")
        try:
            if predicate():
                return
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.05)
    raise SpawnError(f"timed out after {timeout:g} s waiting for {what}")
