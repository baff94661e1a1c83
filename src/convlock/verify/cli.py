"""``convlock verify``: the command line of the guarantee checker.

Exit status: 0 when every property held, 1 when any was violated, 2 for a
bad command line or configuration or an unreachable Redis (one message that
says what to fix, no traceback).

The progress line is a plain carriage-return line on a terminal (a line every
five seconds otherwise, so CI logs stay readable) rather than rich or tqdm:
it is one string, and a dependency for it would be the only one verify adds
to the core install.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ..cli_args import positive_float, positive_int
from ..errors import ConfigError

__all__ = ["add_parser", "run"]

DEFAULT_FAULTS = "kill,pause,cancel,hostile-ids"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``verify`` on the ``convlock`` sub-command parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "verify",
        help="check the lock store's guarantees under real faults",
        description="Run worker processes that lock random conversations and update a fenced register, "
        "inject faults (kill, pause, cancel, restart, hostile IDs), and check mutual exclusion, FIFO, "
        "no lost update, liveness, increasing tokens and no leftover keys. Exit 0: all held; 1: a "
        "property was violated; 2: usage, configuration or connection error.",
    )
    parser.add_argument(
        "--endpoints", type=Path, metavar="FILE", help="endpoints.yml whose lock_store: block to verify"
    )
    parser.add_argument(
        "--spawn-redis",
        nargs="?",
        const="standalone",
        choices=["standalone", "sentinel"],
        default=None,
        help="start a private redis-server on a free loopback port and verify on it; 'sentinel' starts a "
        "master, a replica and 3 Sentinels instead, for the failover fault",
    )
    parser.add_argument("--processes", type=positive_int, default=8, help="worker processes (default 8)")
    parser.add_argument("--conversations", type=positive_int, default=16, help="conversations (default 16)")
    parser.add_argument(
        "--duration", type=positive_float, default=30.0, help="seconds of load (default 30)"
    )
    parser.add_argument(
        "--lifetime", type=positive_float, default=2.0, help="lease length in seconds (default 2)"
    )
    parser.add_argument(
        "--faults",
        default=None,
        metavar="LIST|none",
        help=f"comma-separated faults (default {DEFAULT_FAULTS}, plus restart with --spawn-redis, or "
        "failover with --spawn-redis sentinel)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the fault schedule (default: random, printed)"
    )
    parser.add_argument("--report", type=Path, metavar="FILE", help="write the JSON report here")
    parser.add_argument(
        "--timeline",
        type=Path,
        metavar="FILE",
        help="write the PNG timeline here (default: the report's name, .png)",
    )
    parser.add_argument("--history", type=Path, metavar="FILE", help="write every event here, as JSON lines")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.set_defaults(func=run)
    return parser


def _progress(stream: Any) -> Any:
    tty = stream.isatty()
    last = [0.0]

    def show(line: str, final: bool) -> None:
        if tty:
            stream.write("\r" + line.ljust(100) + ("\n" if final else ""))
            stream.flush()
        elif final or time.monotonic() - last[0] >= 5:
            last[0] = time.monotonic()
            stream.write(line + "\n")
            stream.flush()

    return show


def run(args: argparse.Namespace) -> int:
    """Run ``convlock verify``; return the exit status."""
    from .faults import parse_faults
    from .report import render_table, report_json, write_timeline
    from .runner import UsageError, VerifyOptions, run_verify

    logging.getLogger("convlock").setLevel(logging.ERROR)  # store warnings are expected under faults
    spawn = args.spawn_redis is not None
    try:
        sentinel = args.spawn_redis == "sentinel"
        default = DEFAULT_FAULTS + (",failover" if sentinel else ",restart" if spawn else "")
        text = args.faults if args.faults is not None else default
        try:
            faults = parse_faults(text, spawn=spawn, sentinel=sentinel)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        options = VerifyOptions(
            endpoints=args.endpoints,
            spawn=spawn,
            sentinel=sentinel,
            processes=args.processes,
            conversations=args.conversations,
            duration=args.duration,
            lifetime=args.lifetime,
            faults=faults,
            seed=args.seed,
            history=args.history,
            progress=None if args.quiet else _progress(sys.stderr),
        )
        result = asyncio.run(run_verify(options))
    except (UsageError, ConfigError) as exc:
        print(f"convlock verify: {exc}", file=sys.stderr)
        return 2
    print(render_table(result))
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(
            json.dumps(report_json(result), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        print(f"report written to {args.report}")
    timeline = args.timeline or (args.report.with_suffix(".png") if args.report is not None else None)
    if timeline is not None:
        print(write_timeline(result, timeline))
    return 0 if result.result.ok else 1
