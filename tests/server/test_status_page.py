"""``GET /status`` rendered in real headless Chromium: locks, queues, health, rates; IDs stay text."""

from __future__ import annotations

import asyncio
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from chromium import dump_dom, find_chromium, png_size, screenshot
from server_procs import start_server, write_endpoints

from redis_procs import RedisProcess

WEBHOOK = "/webhooks/rest/webhook"
HANDLER = "convlock_test_handlers:control"
XSS_ALERT = "<img src=x onerror=alert(1)>"
XSS_TITLE = "<img src=x onerror=\"document.title='pwned'\">"
DOCS = Path(__file__).resolve().parents[2] / "docs"
#: Set to 1 to refresh the README's screenshot, docs/status.png, from this test.
UPDATE_ENV = "CONVLOCK_UPDATE_SCREENSHOT"


class _Dom(HTMLParser):
    """Counts elements by tag and gathers the text of each ``td.cid`` cell and of ``<title>``."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}
        self.cids: list[str] = []
        self.title = ""
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "td" and ("class", "cid") in attrs:
            self._in = "cid"
            self.cids.append("")
        elif tag == "title":
            self._in = "title"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "title"):
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "cid":
            self.cids[-1] += data
        elif self._in == "title":
            self.title += data


@pytest.fixture(scope="module")
def chromium() -> str:
    found = find_chromium()
    if found is None:
        pytest.skip("no chromium binary (scripts/test installs Debian's chromium package when run as root)")
    return found


@pytest.mark.slow
async def test_status_page_in_chromium(chromium: str, redis_server: RedisProcess, tmp_path: Path) -> None:
    connection = {"url": redis_server.host, "port": redis_server.port, "db": 0, "socket_timeout": 2}
    endpoints = write_endpoints(
        tmp_path / "endpoints.yml",
        {"lock_store": {"type": "redis", "lifetime": 60, **connection}, "tracker_store": {"type": "redis", **connection}},
    )
    server = start_server(tmp_path, endpoints=endpoints, handler=HANDLER)
    held: list[asyncio.Task[httpx.Response]] = []
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            for i in range(4):  # finished messages, for the rates
                assert (await http.post(WEBHOOK, json={"sender": "dana", "message": f"hi {i}"})).status_code == 200
            busy = {"alice": 3, XSS_ALERT: 2, XSS_TITLE: 1, "order-4711": 2}
            for sender, count in busy.items():
                for _ in range(count):
                    held.append(asyncio.create_task(
                        http.post(WEBHOOK, json={"sender": sender, "message": "ctl:sleep:30"})
                    ))
                    await asyncio.sleep(0.05)  # draw in a known order
            for _ in range(400):
                locks = (await http.get("/locks")).json()["locks"]
                queued = {lock["conversation_id"]: len(lock["waiting"]) for lock in locks}
                if queued == {sender: count - 1 for sender, count in busy.items()}:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"locks never queued as expected: {locks}")
            plain = await http.get("/status")
            assert plain.status_code == 200
            assert plain.headers["content-type"] == "text/html; charset=utf-8"
            assert "default-src 'none'" in plain.headers["content-security-policy"]

            url = f"{server.url}/status"
            dom_text = await asyncio.to_thread(dump_dom, chromium, url)
            png = await asyncio.to_thread(screenshot, chromium, url, tmp_path / "status.png")
    finally:
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        server.kill()

    dom = _Dom()
    dom.feed(dom_text)
    assert dom.title == "convlock status", "no script changed the title"
    assert dom.tags.get("img", 0) == 0, "a conversation ID became an element"
    assert dom.tags.get("script", 0) == 0
    assert sorted(dom.cids) == sorted(["alice", XSS_ALERT, XSS_TITLE, "order-4711"]), "IDs render as text"
    assert dom.tags.get("tr", 0) >= 4 + 1 + 2 + 1
    assert 'http-equiv="refresh"' in dom_text
    assert "lock store" in dom_text
    assert "tracker store" in dom_text
    assert dom_text.count('<span class="ok">ok</span>') == 2
    assert '<td>ok</td><td class="n">' in dom_text, "the message rates table lists outcome ok"
    assert '<td class="n">4</td></tr>' in dom_text, "4 messages finished"

    assert png_size(png) == (1100, 760)
    assert png.stat().st_size > 20_000, "a rendered page, not a blank one"
    if os.environ.get(UPDATE_ENV) == "1":
        shutil.copyfile(png, DOCS / "status.png")
