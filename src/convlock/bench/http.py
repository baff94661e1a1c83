"""A minimal HTTP/1.1 keep-alive client for the server scenario.

httpx costs more CPU per request than the server does, and on two cores the
load generator would then measure itself; this sends one fixed request
shape and reads ``Content-Length`` bodies, nothing more. The same client
drives ``convlock run`` and the bare echo, so their ratio is fair.
"""

from __future__ import annotations

import asyncio

__all__ = ["Connection"]


class Connection:
    """One keep-alive connection to ``http://host:port``."""

    def __init__(self, url: str) -> None:
        self.host, _, port = url.removeprefix("http://").partition(":")
        self.port = int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send one POST with a JSON body; return status, headers (lower-case names) and body."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        payload = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, payload

    async def close(self) -> None:
        """Close the connection if it was opened."""
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()
