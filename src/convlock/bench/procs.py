"""The processes a bench run owns: its redis-server, ``convlock run`` replicas, echo servers and workers.

redis-server comes from :class:`convlock.verify.spawn.SpawnedRedis` (the one
package-side way to start Redis), without persistence: verify's
``appendfsync always`` models a durable Redis, which would make this bench
measure the disk. Replicas and workers are children of this process
(``sys.executable``), on free loopback ports; whoever starts one stops it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..verify.spawn import SpawnedRedis, free_port

__all__ = ["RedisTarget", "Replica", "Worker", "spawn_redis", "start_echo", "start_replica"]

_READY_TIMEOUT = 30.0


@dataclass(frozen=True)
class RedisTarget:
    """The Redis a run measures: where it is, and its pid when this run started it (for pinning)."""

    host: str
    port: int
    db: int = 0
    password: str | None = None
    username: str | None = None
    pid: int | None = None

    @property
    def url(self) -> str:
        """A ``redis://`` URL (with credentials when set)."""
        auth = ""
        if self.password is not None:
            auth = f"{self.username or ''}:{self.password}@"
        return f"redis://{auth}{self.host}:{self.port}/{self.db}"

    def endpoints_block(self) -> dict[str, Any]:
        """The connection keys of a ``lock_store:``/``tracker_store:`` block."""
        block: dict[str, Any] = {"type": "redis", "url": self.host, "port": self.port, "db": self.db}
        if self.password is not None:
            block["password"] = self.password
        if self.username is not None:
            block["username"] = self.username
        return block


def spawn_redis(directory: Path) -> tuple[SpawnedRedis, RedisTarget]:
    """Start a private redis-server on a free loopback port, without persistence."""
    server = SpawnedRedis(directory, extra_args=("--appendonly", "no"))
    server.start()
    popen = server._popen
    assert popen is not None
    return server, RedisTarget("127.0.0.1", server.port, 0, pid=popen.pid)


class Replica:
    """One HTTP server process (``convlock run`` or the bare echo) on a loopback port."""

    def __init__(self, popen: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.popen = popen
        self.port = port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self) -> None:
        """Poll ``/health`` until it answers 200; raise with the log if the process died or never did."""
        deadline = time.monotonic() + _READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"server exited with {self.popen.returncode}:\n{self._log()}")
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(f"{self.url}/health", timeout=1) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"server not ready after {_READY_TIMEOUT:g}s:\n{self._log()}")

    def _log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def _launch(argv: list[str], log_dir: Path, port: int) -> Replica:
    log_path = log_dir / f"server-{port}.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    return Replica(popen, port, log_path)


def start_replica(log_dir: Path, endpoints: dict[str, Any] | None = None) -> Replica:
    """Start ``convlock run`` (demo handler, no token) with these endpoints; not waited for.

    Every other option is ``convlock run``'s default (the log level too), so
    the bench measures the server a user starts.
    """
    port = free_port()
    argv = [sys.executable, "-c", "import sys; from convlock.cli import main; sys.exit(main())", "run",
            "--port", str(port)]
    if endpoints is not None:
        path = log_dir / f"endpoints-{port}.yml"
        path.write_text(yaml.safe_dump(endpoints), encoding="utf-8")
        argv += ["--endpoints", str(path)]
    return _launch(argv, log_dir, port)


def start_echo(log_dir: Path) -> Replica:
    """Start the bare Starlette echo (:mod:`convlock.bench.echo`) on uvicorn; not waited for."""
    port = free_port()
    return _launch([sys.executable, "-m", "convlock.bench.echo", "--port", str(port)], log_dir, port)


class Worker:
    """A :mod:`convlock.bench.worker` child: one JSON command per line in, one JSON answer out."""

    def __init__(self, log_path: Path, *, wait: bool = True) -> None:
        with log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "convlock.bench.worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until the worker says ``ready``; raise if it said anything else or exited.

        Start several with ``wait=False`` and then wait for each: their
        imports then overlap instead of running one after another.
        """
        line = self._read()
        if line.strip() != "ready":
            raise RuntimeError(f"bench worker did not start: {line!r}")

    def _read(self) -> str:
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"bench worker exited with {self.popen.wait(5)}")
        return line

    def send(self, command: dict[str, Any]) -> None:
        """Send one command (answer with :meth:`receive`)."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps(command) + "\n")
        self.popen.stdin.flush()

    def receive(self) -> Any:
        """The answer to the last command; raise with the worker's error if it failed."""
        answer = json.loads(self._read())
        if "error" in answer:
            raise RuntimeError(f"bench worker failed: {answer['error']}")
        return answer["result"]

    def stop(self) -> None:
        """Close its stdin (it exits) and reap it; SIGKILL after 10 s."""
        with contextlib.suppress(OSError):
            if self.popen.stdin is not None:
                self.popen.stdin.close()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


def run_all(workers: list[Worker], commands: list[dict[str, Any]]) -> list[Any]:
    """Send one command to each worker at once, then collect every answer."""
    for worker, command in zip(workers, commands, strict=True):
        worker.send(command)
    # Read every answer before raising, so that no worker is left one answer behind.
    answers: list[Any] = []
    errors: list[str] = []
    for worker in workers:
        try:
            answers.append(worker.receive())
        except RuntimeError as exc:
            errors.append(str(exc))
    if errors:
        raise RuntimeError(errors[0])
    return answers
