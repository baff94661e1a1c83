"""The ``convlock`` command line: ``convlock run`` starts the message server.

The operations commands live in their own modules and register here:
``convlock locks ...`` (:mod:`convlock.cli_locks`) and ``convlock
check-config`` (:mod:`convlock.cli_check`).

``main(argv)`` returns the exit status: 0 after a clean shutdown (SIGTERM or
Ctrl+C included), 2 for a bad command line or configuration (one message
naming the key or flag, no traceback), 1 when the server could not start
(including when the ``server`` extra, which holds the ASGI stack, is not
installed: the message names it).
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
from typing import TYPE_CHECKING

from .cli_args import positive_float, positive_int
from .errors import ConfigError

if TYPE_CHECKING:
    from .server.access import AccessSettings

__all__ = ["main"]

DEFAULT_PORT = 5005
AUTH_TOKEN_ENV = "CONVLOCK_AUTH_TOKEN"
WEBHOOK_TOKEN_ENV = "CONVLOCK_WEBHOOK_TOKEN"
WEBHOOK_HMAC_SECRET_ENV = "CONVLOCK_WEBHOOK_HMAC_SECRET"


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
        type=positive_int,
        default=1,
        help="worker processes (more than 1 needs Redis lock and tracker stores)",
    )
    security = run.add_argument_group("security (see the README's Security section)")
    security.add_argument(
        "--auth-token",
        default=os.environ.get(AUTH_TOKEN_ENV),
        help=f"token every route but the webhook, / and /health needs (default ${AUTH_TOKEN_ENV}); "
        "unset: they answer on a loopback bind only, and force-release is off",
    )
    security.add_argument(
        "--metrics-public",
        action="store_true",
        help="serve /metrics without the token (for a scraper that cannot send one)",
    )
    security.add_argument(
        "--webhook-token",
        default=os.environ.get(WEBHOOK_TOKEN_ENV),
        help=f"token the webhook then needs as a bearer header or ?token= (default ${WEBHOOK_TOKEN_ENV})",
    )
    security.add_argument(
        "--webhook-hmac-secret",
        default=os.environ.get(WEBHOOK_HMAC_SECRET_ENV),
        help="shared secret: the webhook then needs X-Convlock-Signature: sha256=<HMAC-SHA256 of the body> "
        f"(default ${WEBHOOK_HMAC_SECRET_ENV})",
    )
    security.add_argument("--ssl-certfile", metavar="PEM", help="serve HTTPS with this certificate (chain)")
    security.add_argument("--ssl-keyfile", metavar="PEM", help="the private key of --ssl-certfile")
    run.add_argument(
        "--handler-timeout",
        type=positive_float,
        default=30.0,
        help="seconds a handler may run before the client gets 504 (default 30)",
    )
    run.add_argument(
        "--shutdown-timeout",
        type=positive_float,
        default=None,
        help="seconds to let messages in flight finish on SIGTERM (default: handler timeout + 10)",
    )
    run.add_argument(
        "--max-waiting-per-conversation",
        type=positive_int,
        default=100,
        metavar="N",
        help="messages of one conversation that may wait for its lock in this process; more get 429 "
        "with Retry-After (default 100)",
    )
    run.add_argument(
        "--process-abandoned",
        action="store_true",
        help="process a message even if its client disconnected before the lock was granted "
        "(for fire-and-forget clients that close the socket right after sending)",
    )
    run.add_argument(
        "--http",
        default="auto",
        choices=["auto", "httptools", "h11"],
        help="HTTP parser (default auto: httptools when installed, else h11)",
    )
    run.add_argument(
        "--loop",
        default="auto",
        choices=["auto", "uvloop", "asyncio"],
        help="event loop (default auto: uvloop when installed, else asyncio)",
    )
    run.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    run.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text lines, or one JSON object per line (default text); secrets are masked in both",
    )
    from . import cli_check, cli_locks
    from .verify import cli as verify_cli

    verify_cli.add_parser(commands)
    cli_locks.add_parser(commands)
    cli_check.add_parser(commands)
    from .bench import cli as bench_cli

    bench_cli.add_parser(commands)
    return parser


def _ignore(signum: int, frame: FrameType | None) -> None:
    """Replaces the default SIGTERM/SIGINT action once uvicorn has handled the signal.

    uvicorn re-raises the signal it shut down on; with the default action
    that would kill the process after a clean shutdown and lose exit code 0.
    """


SERVER_EXTRA_MODULES = frozenset({"uvicorn", "starlette", "prometheus_client"})


def _run(args: argparse.Namespace) -> int:
    # The server stack is the optional `server` extra: the core library
    # (the lock stores) installs without it.
    try:
        import uvicorn

        from .server.app import build_app, tune_gc_for_serving
        from .server.handlers import DEFAULT_HANDLER
        from .server.options import OPTIONS_ENV, ServerOptions, build_context
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] not in SERVER_EXTRA_MODULES:
            raise
        print(
            f"convlock run: the server needs the 'server' extra ({exc.name} is not installed); "
            "install it with: pip install 'convlock[server]'",
            file=sys.stderr,
        )
        return 1

    # Like "python -m", let --handler name modules in the working directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port: got {args.port}; give a port between 1 and 65535")
    _check_tls(args.ssl_certfile, args.ssl_keyfile)
    options = ServerOptions(
        endpoints=args.endpoints,
        handler=args.handler or DEFAULT_HANDLER,
        handler_timeout=args.handler_timeout,
        auth_token=args.auth_token or None,
        workers=args.workers,
        max_waiting_per_conversation=args.max_waiting_per_conversation,
        host=args.host,
        metrics_public=args.metrics_public,
        webhook_token=args.webhook_token or None,
        webhook_hmac_secret=args.webhook_hmac_secret or None,
        log_level=args.log_level,
        log_format=args.log_format,
        process_abandoned=args.process_abandoned,
    )
    options.configure_logging()
    ctx = build_context(options)  # raises ConfigError before anything listens
    _warn_about_access(args.host, ctx.access)
    shutdown_timeout = args.shutdown_timeout or args.handler_timeout + 10
    common = {
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
        "timeout_graceful_shutdown": shutdown_timeout,
        "access_log": args.log_level == "debug",
        "server_header": False,
        "ssl_certfile": args.ssl_certfile,
        "ssl_keyfile": args.ssl_keyfile,
        # The fast stack by default (uvloop and httptools, installed with the
        # server extra where they exist); --http h11 / --loop asyncio choose
        # the pure-Python ones, which "auto" also falls back to.
        "http": args.http,
        "loop": args.loop,
        # Our root handler formats (and masks) uvicorn's records as well.
        "log_config": None,
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
    tune_gc_for_serving()
    server.run()
    return 0 if server.started else 1


def _check_tls(certfile: str | None, keyfile: str | None) -> None:
    """Refuse TLS files that uvicorn could not load, naming the flag, before anything listens."""
    if certfile is None and keyfile is None:
        return
    if certfile is None or keyfile is None:
        raise ConfigError(
            "--ssl-certfile and --ssl-keyfile go together; give both to serve HTTPS, or neither"
        )
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"--ssl-certfile/--ssl-keyfile: {exc.filename or 'a file'} does not exist; give PEM files"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"--ssl-certfile/--ssl-keyfile: cannot load the certificate and key ({type(exc).__name__}: "
            f"{getattr(exc, 'reason', None) or exc.strerror or 'bad PEM'}); give a PEM certificate and "
            "its matching unencrypted PEM key"
        ) from None


def _warn_about_access(host: str, access: AccessSettings) -> None:
    log = logging.getLogger("convlock.server")
    if not access.local_bind and access.auth_token is None:
        log.warning(
            "listening on %s without --auth-token: tracker, lock, metrics and OpenAPI routes answer 403 "
            "and force-release is off; set --auth-token (or $%s) to enable them",
            host,
            AUTH_TOKEN_ENV,
        )
    if not access.local_bind and access.webhook_token is None and access.webhook_hmac_secret is None:
        log.info(
            "the webhook is open to anyone who can reach %s; --webhook-token or --webhook-hmac-secret "
            "authenticates it",
            host,
        )
    if access.metrics_public:
        log.info("--metrics-public: /metrics answers without the token")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``convlock`` console script; returns the exit status."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    command = getattr(args, "func", None)
    if command is not None:
        # A sub-command with its own module (verify, locks, check-config).
        # No handler set up here: logging's last resort prints warnings to
        # whatever sys.stderr is at the time, which suits a short command.
        status: int = command(args)
        return status
    try:
        return _run(args)
    except ConfigError as exc:
        print(f"convlock run: {exc}", file=sys.stderr)
        return 2
