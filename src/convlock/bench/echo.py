"""The bare-echo baseline of the server scenario: a Starlette JSON echo on the same uvicorn.

``python -m convlock.bench.echo --port N`` serves ``POST
/webhooks/rest/webhook`` (answers ``[{"recipient_id": sender, "text":
message}]``) and ``GET /health``, with no lock, no tracker and no
middleware: what the HTTP stack alone costs, so that ``convlock run``'s
messages/s can be read as a ratio against it.

The uvicorn options (:data:`UVICORN_OPTIONS`) must stay those ``convlock
run`` uses (see ``convlock.cli``); otherwise the ratio would compare HTTP
stacks, not convlock. Open question: ``convlock.cli`` could export them so
that this module cannot drift.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["UVICORN_OPTIONS", "build_app", "main"]

#: What ``convlock run`` passes to uvicorn, besides host and port.
UVICORN_OPTIONS: dict[str, Any] = {
    "http": "auto",  # convlock run's default: httptools where installed, else h11
    "loop": "auto",  # uvloop where installed, else asyncio
    "access_log": False,
    "server_header": False,
    "log_level": "warning",
}


def build_app() -> Any:
    """The echo app: one webhook route and a health check."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def webhook(request: Request) -> Response:
        body = json.loads(await request.body())
        return JSONResponse([{"recipient_id": body.get("sender"), "text": body.get("message")}])

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[Route("/webhooks/rest/webhook", webhook, methods=["POST"]), Route("/health", health)]
    )


def main() -> None:
    """Serve the echo app on 127.0.0.1."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(build_app(), host="127.0.0.1", port=args.port, **UVICORN_OPTIONS)


if __name__ == "__main__":
    main()
