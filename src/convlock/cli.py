"""The ``convlock`` command line: ``convlock run`` starts the message server.

``main(argv)`` returns the exit status: 0 after a clean shutdown (SIGTERM or
Ctrl+C included), 2 for a bad command line or configuration (one message
naming the key or flag, no traceback), 1 when the server could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from .errors import ConfigError

__all__ = ["main"]

DEFAULT_PORT = 5005
AUTH_TOKEN_ENV = "CONVLOCK_AUTH_TOKEN"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convlock", description="Per-conversation ticket locks for chat servers."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="start the message server",
        description="Serve POST /webhooks/rest/webhook, processing each conversation's messages one at "
        "a time under its ticket lock, with state saved fenced by the lock's ticket.",
    )
    run.add_argument(
        "--endpoints", metavar="FILE", help="endpoints.yml with lock_store: and tracker_store: blocks"
    )
    run.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (default 127.0.0.1; use 0.0.0.0 behind a load balancer)",
    )
    run.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    run.add_argument(
        "--handler",
        default=None,
        metavar="MODULE:CALLABLE",
        help="async message handler (default: the built-in demo that echoes with turn numbers)",
    )
    run.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="worker processes (more than 1 needs Redis lock and tracker stores)",
    )
    run.add_argument(
        "--auth-token",
        default=os.environ.get(AUTH_TOKEN_ENV),
        help=f"token for DELETE /locks/{{id}} (default ${AUTH_TOKEN_ENV}; unset disables it)",
    )
    run.add_argument(
        "--handler-timeout",
        type=_positive_float,
        default=30.0,
        help="seconds a handler may run before the client gets 504 (default 30)",
    )
    run.add_argument(
        "--shutdown-timeout",
        type=_positive_float,
        default=None,
        help="seconds to let messages in flight finish on SIGTERM (default: handler timeout + 10)",
    )
    run.add_argument(
        "--process-abandoned",
        action="store_true",
        help="process a message even if its client disconnected before the lock was granted "
        "(for fire-and-forget clients that close the socket right after sending)",
    )
    run.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def _ignore(signum: int, frame: FrameType | None) -> None:
    """Replaces the default SIGTERM/SIGINT action once uvicorn has handled the signal.

    uvicorn re-raises the signal it shut down on; with the default action
    that would kill the process after a clean shutdown and lose exit code 0.
    """


def _run(args: argparse.Namespace) -> int:
    import uvicorn

    from .server.app import build_app
    from .server.handlers import DEFAULT_HANDLER
    from .server.options import OPTIONS_ENV, ServerOptions, build_context

    # Like "python -m", let --handler name modules in the working directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port: got {args.port}; give a port between 1 and 65535")
    options = ServerOptions(
        endpoints=args.endpoints,
        handler=args.handler or DEFAULT_HANDLER,
        handler_timeout=args.handler_timeout,
        auth_token=args.auth_token or None,
        workers=args.workers,
        process_abandoned=args.process_abandoned,
    )
    ctx = build_context(options)  # raises ConfigError before anything listens
    shutdown_timeout = args.shutdown_timeout or args.handler_timeout + 10
    common = {
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
        "timeout_graceful_shutdown": shutdown_timeout,
        "access_log": args.log_level == "debug",
        "server_header": False,
    }
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _ignore)
    if args.workers > 1:

        async def close() -> None:
            await ctx.lock_store.aclose()
            await ctx.tracker_store.aclose()

        asyncio.run(close())  # the parent only checked the setup; each worker builds its own
        os.environ[OPTIONS_ENV] = options.to_environment()
        uvicorn.run("convlock.server.app:app_from_environment", factory=True, workers=args.workers, **common)
        return 0
    server = uvicorn.Server(uvicorn.Config(build_app(ctx), lifespan="on", **common))
    server.run()
    return 0 if server.started else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``convlock`` console script; returns the exit status."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _run(args)
    except ConfigError as exc:
        print(f"convlock run: {exc}", file=sys.stderr)
        return 2
