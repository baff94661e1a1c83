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
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

__all__ = ["REDIS_SERVER_ENV", "SpawnError", "SpawnedRedis", "find_redis_server", "free_port"]

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

    def __init__(self, directory: Path, *, binary: str | None = None) -> None:
        self.binary = binary or find_redis_server()
        self.directory = directory
        self.port = free_port()
        self._popen: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "redis.log"

    @property
    def pid(self) -> int | None:
        """The running server's process ID."""
        return None if self._popen is None else self._popen.pid

    def _argv(self) -> list[str]:
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
