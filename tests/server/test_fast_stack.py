"""The fast stack: uvloop and httptools by default where installed, a clean fallback where not."""

from __future__ import annotations

from pathlib import Path

import httpx
from server_procs import start_server

# Imported by the server process (first on its PYTHONPATH): makes uvloop and
# httptools unimportable, as on a platform where they do not exist.
BLOCKER = '''
import sys
for name in ("uvloop", "httptools"):
    sys.modules[name] = None  # "import uvloop" now raises ImportError
'''


def test_the_server_falls_back_to_asyncio_and_h11_without_the_fast_stack(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    server = start_server(tmp_path, env={"PYTHONPATH": str(blocker)})
    try:
        reply = httpx.post(f"{server.url}/webhooks/rest/webhook", json={"sender": "s", "message": "hi"}, timeout=10)
        assert reply.status_code == 200, server.log()
        assert reply.json()[0]["text"] == "#1: hi"
        # h11 (not httptools) parsed it: an unknown method reaches the app and gets JSON.
        weird = httpx.request("FOO", f"{server.url}/", timeout=10)
        assert weird.status_code == 405
        assert weird.json()["error"] == "method_not_allowed"
    finally:
        assert server.stop() == 0, server.log()


def test_the_server_uses_httptools_when_it_is_installed(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        # httptools refuses an unknown method in the parser, before the app.
        weird = httpx.request("FOO", f"{server.url}/", timeout=10)
        assert weird.status_code == 400
        assert weird.headers["content-type"].startswith("text/plain")
    finally:
        assert server.stop() == 0, server.log()
