"""Start real ``convlock run`` processes for tests and benchmarks.

Each server listens on a free loopback port, writes its log to a file, and
is ready once ``GET /health`` answers 200. Whoever starts a server stops it;
an ``atexit`` fallback kills any still running when the interpreter exits.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

import redis_procs

__all__ = ["HERE", "ServerProcess", "start_server", "write_endpoints"]

HERE = Path(__file__).resolve().parent
READY_TIMEOUT = 20.0

_live: dict[int, subprocess.Popen[bytes]] = {}


def _kill_leftovers() -> None:
    for popen in list(_live.values()):
        with contextlib.suppress(ProcessLookupError):
            popen.kill()
        with contextlib.suppress(Exception):
            popen.wait(5)


atexit.register(_kill_leftovers)


def write_endpoints(path: Path, config: dict[str, Any]) -> Path:
    """Write ``config`` as an endpoints.yml at ``path`` and return the path."""
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


class ServerProcess:
    """One running ``convlock run``; ``url`` is its base URL."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        port: int,
        log_path: Path,
        *,
        host: str = "127.0.0.1",
        scheme: str = "http",
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.popen = popen
        self.port = port
        self.log_path = log_path
        self.url = f"{scheme}://{host}:{port}"
        self.verify = verify

    @property
    def pid(self) -> int:
        """The server's process ID."""
        return self.popen.pid

    def log(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll ``/health`` until it answers 200; raise with the log if the server died or never did."""
        deadline = time.monotonic() + timeout
        # One client for every poll: httpx.get() builds a TLS context each
        # time (about 60 ms of CPU), which the starting server, on the same
        # two cores, then waited for.
        with httpx.Client(timeout=1.0, verify=self.verify) as client:
            while time.monotonic() < deadline:
                if self.popen.poll() is not None:
                    raise RuntimeError(f"convlock run exited with {self.popen.returncode}:\n{self.log()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                time.sleep(0.05)
        raise RuntimeError(f"convlock run not ready after {timeout}s:\n{self.log()}")

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the server."""
        self.popen.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the exit, and return the exit status (SIGKILL past ``timeout``)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        _live.pop(self.pid, None)
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the server and reap it."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)
        _live.pop(self.pid, None)


def start_server(
    log_dir: Path,
    *args: str,
    endpoints: Path | None = None,
    handler: str | None = None,
    port: int | None = None,
    wait: bool = True,
    env: dict[str, str] | None = None,
    host: str | None = None,
    log_level: str = "warning",
    tls_ca: Path | None = None,
) -> ServerProcess:
    """Start ``convlock run`` with ``args`` on a free port and (by default) wait until it is ready.

    The test handlers module in this folder is importable by the server.
    ``host`` is passed as ``--host`` (default: the server's, 127.0.0.1);
    ``tls_ca`` makes the URL ``https`` and verifies the server against it.
    """
    port = port or redis_procs.free_port()
    argv = [sys.executable, "-c", "import sys; from convlock.cli import main; sys.exit(main())", "run",
            "--port", str(port), "--log-level", log_level, *args]
    if host is not None:
        argv += ["--host", host]
    if endpoints is not None:
        argv += ["--endpoints", str(endpoints)]
    if handler is not None:
        argv += ["--handler", handler]
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), environment.get("PYTHONPATH")]))
    environment.update(env or {})
    return launch(
        argv, log_dir / f"convlock-{port}.log", port, env=environment, wait=wait,
        host=host or "127.0.0.1", scheme="https" if tls_ca else "http",
        verify=ssl.create_default_context(cafile=str(tls_ca)) if tls_ca else True,
    )


def launch(
    argv: list[str],
    log_path: Path,
    port: int,
    *,
    env: dict[str, str] | None = None,
    wait: bool = True,
    **server: Any,
) -> ServerProcess:
    """Start ``argv`` (an HTTP server on ``port``), logging to ``log_path``; wait until it is ready.

    ``server`` goes to :class:`ServerProcess` (host, scheme, verify). The
    process is killed at exit if a test leaves it running.
    """
    with log_path.open("wb") as log:
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    _live[popen.pid] = popen
    process = ServerProcess(popen, port, log_path, **server)
    if wait:
        try:
            process.wait_ready()
        except BaseException:
            process.kill()
            raise
    return process


async def all_events(url: str, **client_options: Any) -> list[dict[str, Any]]:
    """Every stored event of a conversation, read page by page from its tracker URL (``?after=``).

    It uses a client of its own: after a long burst, a connection pooled by
    the caller's client may be one the server has just closed as idle
    (uvicorn's keep-alive timeout), and reusing it races with that close.
    """
    events: list[dict[str, Any]] = []
    after: int | None = 0
    async with httpx.AsyncClient(timeout=30, **client_options) as http:
        while after is not None:
            response = await http.get(url, params={"after": after, "limit": 1000})
            assert response.status_code == 200, response.text
            page = response.json()
            events += page["events"]
            after = page["next_after"]
    return events
