"""``python starlette_route_server.py --port N [--webhook-token T] [--webhook-hmac-secret S]``.

Serves what ``convlock run`` serves (in-memory stores, the demo handler, the
same uvicorn options that matter to an answer), except that the chat
channel is answered by the Starlette route rather than by
:mod:`convlock.server.webhook_asgi`: the reference the fast path is compared
with in ``test_webhook_asgi.py``.
"""

from __future__ import annotations

import argparse

import uvicorn

from convlock.server.app import build_app
from convlock.server.handlers import DEFAULT_HANDLER
from convlock.server.options import ServerOptions, build_context


def main() -> None:
    """Parse the flags and serve until SIGTERM."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--webhook-token")
    parser.add_argument("--webhook-hmac-secret")
    args = parser.parse_args()
    options = ServerOptions(
        handler=DEFAULT_HANDLER,
        webhook_token=args.webhook_token,
        webhook_hmac_secret=args.webhook_hmac_secret,
        log_level="warning",
    )
    app = build_app(build_context(options), fast_webhook=False)
    # convlock run's options that shape an answer (see convlock.cli).
    uvicorn.run(app, host="127.0.0.1", port=args.port, lifespan="on", log_level="warning",
                access_log=False, server_header=False, log_config=None)


if __name__ == "__main__":
    main()
