"""The attacker's view of ``convlock run``: which routes answer whom, webhook authentication, TLS.

The route sweep reads the app's own route table (and ``/openapi.json``), so
a route someone adds later without thinking about access is probed too:
unless it is listed in :data:`EXPECTED_OPEN` here, it must refuse a caller
without the token. Servers are bound to a non-loopback address of this
machine when it has one (else ``CONVLOCK_TREAT_BIND_AS_PUBLIC=1`` makes a
loopback bind count as public), and requests come over real HTTP.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import re
import shutil
import socket
import struct
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_procs import ServerProcess, start_server
from starlette.routing import BaseRoute, Mount, Route

import redis_procs
from convlock.memory import InMemoryLockStore
from convlock.server.access import SIGNATURE_HEADER, sign_body
from convlock.server.app import build_app
from convlock.server.context import ServerContext
from convlock.server.handlers import demo_handler
from convlock.server.tracker import InMemoryTrackerStore

TOKEN = "attacker-view-token-7f3a"
WEBHOOK = "/webhooks/rest/webhook"
#: The routes anyone may call, written out here rather than imported: widening
#: the code's list must be a visible change to this test as well.
EXPECTED_OPEN = {("POST", WEBHOOK), ("GET", "/"), ("GET", "/health")}
PROBE_ID = "probe-conversation"


def _interface_addresses() -> list[str]:
    """IPv4 addresses of this machine's interfaces (Linux SIOCGIFADDR)."""
    found = []
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
        found.append(socket.inet_ntoa(packed[20:24]))
    return found


def public_address() -> str | None:
    """A non-loopback IPv4 address of this machine that a server can bind, or None."""
    for address in _interface_addresses():
        if ipaddress.ip_address(address).is_loopback:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((address, 0))
            except OSError:
                continue
        return address
    return None


def start_public(log_dir: Path, *args: str, **kwargs: Any) -> ServerProcess:
    """Start a server that treats its bind as public: a real non-loopback bind when there is one."""
    address = public_address()
    if address is not None:
        return start_server(log_dir, *args, host=address, **kwargs)
    env = {**kwargs.pop("env", {}), "CONVLOCK_TREAT_BIND_AS_PUBLIC": "1"}
    return start_server(log_dir, *args, env=env, **kwargs)


def app_routes() -> list[BaseRoute]:
    """The route table of the app ``convlock run`` serves (built in this process, not started)."""
    ctx = ServerContext(InMemoryLockStore(), InMemoryTrackerStore(), demo_handler)
    return list(build_app(ctx).routes)


def concrete(template: str) -> str:
    """A request path for a route template: every ``{param}`` or ``{param:convertor}`` filled in."""
    return re.sub(r"\{[^}]+\}", PROBE_ID, template)


def probes() -> list[tuple[str, str, str]]:
    """(method, route template, concrete path) for every method of every route in the app."""
    found = []
    for route in app_routes():
        if isinstance(route, Route):
            for method in sorted(route.methods or {"GET"}):
                if method != "HEAD":
                    found.append((method, route.path, concrete(route.path)))
        elif isinstance(route, Mount):
            found.append(("GET", route.path, concrete(route.path) + "/"))
        else:  # any other kind of route: probe its path with GET
            found.append(("GET", str(getattr(route, "path", "/")), concrete(str(getattr(route, "path", "/")))))
    return found


def body_for(method: str, template: str) -> dict[str, Any]:
    if method == "POST" and template == WEBHOOK:
        return {"json": {"sender": PROBE_ID, "message": "probe"}}
    return {"json": {}} if method in {"POST", "PUT", "PATCH"} else {}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_public(tmp_path_factory.mktemp("attacker"), "--auth-token", TOKEN)
    yield proc
    assert proc.stop() == 0, proc.log()


def test_the_route_table_is_what_we_probe() -> None:
    found = {(method, template) for method, template, _ in probes()}
    # A sanity floor: if the table could not be read, the sweep below would prove nothing.
    assert ("GET", "/locks") in found
    assert ("DELETE", "/locks/{conversation_id:conversation_id}") in found
    assert ("GET", "/metrics") in found
    assert found >= EXPECTED_OPEN


@pytest.mark.parametrize(("method", "template", "path"), probes(), ids=str)
def test_every_route_not_explicitly_open_needs_the_token(
    guarded: ServerProcess, method: str, template: str, path: str
) -> None:
    url = f"{guarded.url}{path}"
    extra = body_for(method, template)
    anonymous = httpx.request(method, url, timeout=30, **extra)
    if (method, template) in EXPECTED_OPEN:
        assert anonymous.status_code not in {401, 403}, anonymous.text
        return
    assert anonymous.status_code == 401, (method, path, anonymous.status_code, anonymous.text)
    assert anonymous.json()["error"] == "unauthorized"
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert PROBE_ID not in anonymous.text
    wrong = httpx.request(method, url, headers={"Authorization": "Bearer wrong"}, timeout=30, **extra)
    assert wrong.status_code == 401
    wrong_query = httpx.request(method, url, params={"token": "wrong"}, timeout=30, **extra)
    assert wrong_query.status_code == 401
    # A token sent for another scheme, or only a prefix of it, is no token.
    assert httpx.request(method, url, headers={"Authorization": f"Basic {TOKEN}"}, timeout=30,
                         **extra).status_code == 401
    assert httpx.request(method, url, headers={"Authorization": f"Bearer {TOKEN[:-1]}"}, timeout=30,
                         **extra).status_code == 401
    by_header = httpx.request(method, url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30, **extra)
    assert by_header.status_code not in {401, 403}, (method, path, by_header.text)
    assert by_header.status_code < 500, by_header.text
    by_query = httpx.request(method, url, params={"token": TOKEN}, timeout=30, **extra)
    assert by_query.status_code not in {401, 403}, (method, path, by_query.text)


def test_every_documented_route_is_in_the_swept_table(guarded: ServerProcess) -> None:
    document = httpx.get(f"{guarded.url}/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    swept = {(method, re.sub(r":[^}]+\}", "}", template)) for method, template, _ in probes()}
    for path, operations in document["paths"].items():
        for method in operations:
            assert (method.upper(), path) in swept, f"{method.upper()} {path} is documented but not routed"


def test_unknown_paths_and_the_openapi_document_need_the_token(guarded: ServerProcess) -> None:
    assert httpx.get(f"{guarded.url}/no/such/route").status_code == 401
    # A wrong method on an open path says so; on a closed path it is refused like the path.
    assert httpx.get(f"{guarded.url}{WEBHOOK}").status_code == 405
    assert httpx.put(f"{guarded.url}/locks/x").status_code == 401
    assert httpx.get(f"{guarded.url}/openapi.json").status_code == 401
    assert httpx.get(f"{guarded.url}/status").status_code == 401


def test_open_routes_hold_no_data(guarded: ServerProcess) -> None:
    sender = "alice-open-routes"
    assert httpx.post(f"{guarded.url}{WEBHOOK}", json={"sender": sender, "message": "hi"}).status_code == 200
    health = httpx.get(f"{guarded.url}/health")
    assert health.json() == {"status": "ok"}, "details (backends, reasons) are for token holders"
    root = httpx.get(f"{guarded.url}/").json()
    assert set(root) == {"name", "version", "openapi"}
    detailed = httpx.get(f"{guarded.url}/health", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert detailed["lock_store"]["backend"] == "in_memory"


def test_refusals_are_counted_under_their_route(guarded: ServerProcess) -> None:
    httpx.get(f"{guarded.url}/locks")
    text = httpx.get(f"{guarded.url}/metrics", params={"token": TOKEN}).text
    assert 'route="/locks",status="401"' in text


# -- no token: closed on a public bind, open on loopback


def test_without_a_token_a_public_bind_serves_only_the_open_routes(tmp_path: Path) -> None:
    server = start_public(tmp_path, log_level="info")
    try:
        for method, template, path in probes():
            response = httpx.request(method, f"{server.url}{path}", timeout=30, **body_for(method, template))
            if (method, template) in EXPECTED_OPEN:
                assert response.status_code not in {401, 403}, (method, path, response.text)
            else:
                assert response.status_code == 403, (method, path, response.status_code, response.text)
                assert "--auth-token" in response.json()["reason"]
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    finally:
        assert server.stop() == 0
    log = server.log()
    assert "without --auth-token" in log, log
    assert "answer 403" in log, log


def test_without_a_token_loopback_keeps_the_readme_session_working(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.post(WEBHOOK, json={"sender": "alice", "message": "hello"}).json()[0]["text"] == "#1: hello"
            record = http.get("/conversations/alice/tracker")
            assert record.status_code == 200
            assert record.json()["state"] == {"turns": 1}
            assert http.get("/locks/alice").status_code == 200
            assert http.get("/locks").status_code == 200
            assert http.get("/metrics").status_code == 200
            assert http.get("/openapi.json").status_code == 200
            assert "lock_store" in http.get("/health").json()
            # Force-release changes state: never without a token.
            refused = http.delete("/locks/alice")
            assert refused.status_code == 403
            assert "--auth-token" in refused.json()["reason"]
            # A reverse proxy on this host forwarding public traffic is not a local caller.
            for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
                proxied = http.get("/conversations/alice/tracker", headers={header: "203.0.113.9"})
                assert proxied.status_code == 403, header
                assert http.get("/health", headers={header: "203.0.113.9"}).json() == {"status": "ok"}
    finally:
        assert server.stop() == 0


def test_metrics_public_opens_metrics_only(tmp_path: Path) -> None:
    server = start_public(tmp_path, "--auth-token", TOKEN, "--metrics-public")
    try:
        assert httpx.get(f"{server.url}/metrics").status_code == 200
        assert httpx.get(f"{server.url}/locks").status_code == 401
        assert httpx.get(f"{server.url}/conversations/x/tracker").status_code == 401
    finally:
        assert server.stop() == 0


# -- webhook authentication


def test_the_webhook_token_guards_the_channel(tmp_path: Path) -> None:
    server = start_public(tmp_path, "--auth-token", TOKEN, "--webhook-token", "channel-token-1")
    url = f"{server.url}{WEBHOOK}"
    body = {"sender": "wt", "message": "hi"}
    try:
        missing = httpx.post(url, json=body)
        assert missing.status_code == 401
        assert "--webhook-token" in missing.json()["reason"]
        assert httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        # The admin token is not the channel's.
        assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 401
        ok = httpx.post(url, json=body, headers={"Authorization": "Bearer channel-token-1"})
        assert ok.status_code == 200
        assert ok.json()[0]["text"] == "#1: hi"
        assert httpx.post(url, json=body, params={"token": "channel-token-1"}).json()[0]["text"] == "#2: hi"
        record = httpx.get(f"{server.url}/conversations/wt/tracker", headers={"Authorization": f"Bearer {TOKEN}"})
        assert record.json()["state"] == {"turns": 2}, "refused messages were not processed"
    finally:
        assert server.stop() == 0


def test_an_hmac_signature_guards_the_channel(tmp_path: Path) -> None:
    secret = "hmac-shared-secret-9"
    server = start_public(tmp_path, "--auth-token", TOKEN, "--webhook-hmac-secret", secret,
                          "--webhook-token", "or-this-token")
    url = f"{server.url}{WEBHOOK}"
    body = json.dumps({"sender": "signed", "message": "hello"}).encode()
    try:
        assert httpx.post(url, content=body).status_code == 401
        good = httpx.post(url, content=body, headers={SIGNATURE_HEADER: sign_body(secret, body)})
        assert good.status_code == 200
        assert good.json()[0]["text"] == "#1: hello"
        tampered = body.replace(b"hello", b"HELLO")
        forged = httpx.post(url, content=tampered, headers={SIGNATURE_HEADER: sign_body(secret, body)})
        assert forged.status_code == 401
        assert SIGNATURE_HEADER in forged.json()["reason"]
        other_key = httpx.post(url, content=body, headers={SIGNATURE_HEADER: sign_body("other", body)})
        assert other_key.status_code == 401

        # A chunked (streamed) body is checked as a whole, and the channel still reads all of it.
        def chunks() -> Iterator[bytes]:
            yield body[:10]
            yield body[10:]

        streamed = httpx.post(url, content=chunks(), headers={SIGNATURE_HEADER: sign_body(secret, body)})
        assert streamed.status_code == 200
        assert streamed.json()[0]["text"] == "#2: hello"
        # Either configured mechanism lets a message in.
        by_token = httpx.post(url, content=body, headers={"Authorization": "Bearer or-this-token"})
        assert by_token.status_code == 200
        big = httpx.post(url, content=b"x" * (1024 * 1024 + 10), headers={SIGNATURE_HEADER: "sha256=00"})
        assert big.status_code == 413
    finally:
        assert server.stop() == 0


# -- TLS


def test_the_server_speaks_tls_with_the_given_certificate(tmp_path: Path) -> None:
    files = redis_procs.make_tls_files(tmp_path / "certs")
    server = start_server(
        tmp_path, "--ssl-certfile", str(files.server_cert), "--ssl-keyfile", str(files.server_key),
        tls_ca=files.ca_cert,
    )
    try:
        assert server.url.startswith("https://127.0.0.1:")
        response = httpx.post(f"{server.url}{WEBHOOK}", json={"sender": "tls", "message": "hi"},
                              verify=server.verify)
        assert response.status_code == 200
        assert response.json()[0]["text"] == "#1: hi"
        # Without the test CA, the certificate is not trusted.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{server.url}/health")
        # Plain HTTP to the TLS port gets no HTTP answer at all.
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=10)
        # The server is still fine afterwards.
        assert httpx.get(f"{server.url}/health", verify=server.verify).status_code == 200
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(("args", "message"), [
    (["--ssl-certfile", "cert.pem"], "go together"),
    (["--ssl-certfile", "missing.pem", "--ssl-keyfile", "missing.key"], "does not exist"),
    (["--ssl-certfile", "{bad}", "--ssl-keyfile", "{bad}"], "cannot load"),
])
def test_bad_tls_flags_exit_2_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    from convlock.cli import main

    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    argv = ["run", "--port", str(redis_procs.free_port())] + [a.replace("{bad}", str(bad)) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--ssl-" in err, err
    assert message in err, err


# -- what a browser makes of replies that echo user input

XSS_ID = "<img src=x onerror=alert(1)>"


def chromium_dom(url: str, tmp_path: Path) -> str:
    """The DOM headless Chromium builds for ``url`` (after scripts, if any, ran)."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if binary is None:
        pytest.skip("headless Chromium not installed (scripts/test installs Debian's chromium as root)")
    result = subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=2000", "--dump-dom", url],
        capture_output=True, text=True, timeout=90, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_replies_that_echo_an_id_render_as_text_in_chromium(tmp_path: Path) -> None:
    """A conversation ID full of markup, echoed in JSON replies, shows as text and runs nothing.

    The status page (issue 10) has its own Chromium test; this one covers the JSON
    replies every route gives, which carry ``X-Content-Type-Options: nosniff``.
    """
    server = start_server(tmp_path)  # loopback, no token: the reads answer
    try:
        quoted = urllib.parse.quote(XSS_ID, safe="")
        assert httpx.post(f"{server.url}{WEBHOOK}", json={"sender": XSS_ID, "message": XSS_ID}).status_code == 200
        for path in (f"/conversations/{quoted}/tracker", f"/locks/{quoted}", f"/no-such/{quoted}"):
            reply = httpx.get(f"{server.url}{path}")
            assert reply.headers["x-content-type-options"] == "nosniff"
            assert reply.headers["content-type"].startswith("application/json")
            dom = chromium_dom(f"{server.url}{path}", tmp_path)
            assert "&lt;img src=x onerror=alert(1)&gt;" in dom, dom
            assert "<img" not in dom, dom
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.0.2.2", False), ("no-such-host.invalid", False),
])
def test_only_loopback_binds_count_as_local(host: str, loopback: bool) -> None:
    from convlock.server.access import is_loopback_host

    assert is_loopback_host(host) is loopback
