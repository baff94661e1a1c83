"""``convlock check-config [FILE]``: validate an endpoints file, then reach every Redis it names.

Steps, all reported rather than stopping at the first problem:

1. read the file (``endpoints.yml`` by default) with ``${VAR}`` interpolation;
2. validate every block convlock reads (``lock_store:``, ``tracker_store:``)
   with the same models and factories the server uses, so a file that
   passes here starts the server; each problem names its key
   (``lock_store.port``) and the fix; unknown keys are warnings; other
   top-level sections are listed as not used by convlock;
3. for every block with ``type: redis``, connect and print the server
   version, the mode (standalone, Sentinel or Cluster, as the server itself
   reports it), TLS on or off and the round-trip time (median of a few
   PINGs); for the lock store, run one read-only lock script, which proves
   that the ACL user may run scripts.

Exit status: 0 when every block is valid and every Redis answered; 2 for a
bad file or a Redis that cannot be reached or used (with ``lock_store.*``
naming the block). The output never contains a password: servers are named
by :func:`convlock.redis.connection.describe`, and every line also passes
through :func:`convlock.logs.redact` with the file's passwords.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import LockStoreSettings, RedisSettings, load_endpoints, parse_settings
from .errors import ConfigError, LockError
from .logs import redact

__all__ = ["KNOWN_SECTIONS", "add_parser", "check", "run"]

#: The top-level sections convlock reads; others (a framework's action_endpoint, ...) are ignored.
KNOWN_SECTIONS = ("lock_store", "tracker_store")
PINGS = 5
#: The conversation the lock-script probe inspects; inspecting an idle one writes nothing.
PROBE_CONVERSATION = "convlock-check-config-probe"


def add_parser(subparsers: Any) -> None:
    """Register ``check-config`` on the ``convlock`` command's subparsers."""
    parser = subparsers.add_parser(
        "check-config",
        help="validate an endpoints file and connect to every Redis it names",
        description="Validate every block of an endpoints file, then connect to each Redis and print its "
        "version, mode, TLS and round-trip time. Exit status 0 when all is well, 2 otherwise.",
    )
    parser.add_argument(
        "file", nargs="?", default="endpoints.yml", help="endpoints file (default endpoints.yml)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON report instead of text")
    parser.add_argument(
        "--no-connect", action="store_true", help="validate only; do not contact any Redis"
    )
    parser.set_defaults(func=run)


@dataclass
class BlockReport:
    """What was found for one block."""

    section: str
    type: str | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    redis: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "type": self.type,
            "ok": self.ok,
            "problems": self.problems,
            "warnings": self.warnings,
            "redis": self.redis,
        }


class _Warnings(logging.Handler):
    """Collects the config module's unknown-key warnings while a block is validated."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _validate(
    section: str, block: Any, report: BlockReport, built: dict[str, object]
) -> RedisSettings | None:
    """Validate one block as the server would; return its settings when it names a Redis.

    The store built (not connected) is left in ``built[section]`` for the
    checks across blocks.
    """
    from .factory import create_lock_store

    builder: Callable[[Any], Any]
    model: type[RedisSettings]
    if section == "lock_store":
        builder, model = create_lock_store, LockStoreSettings
    else:
        from .server.tracker_factory import TrackerStoreSettings, create_tracker_store

        builder, model = create_tracker_store, TrackerStoreSettings
    kind = block.get("type", "in_memory") if isinstance(block, Mapping) else None
    report.type = str(kind) if kind is not None else "in_memory"
    collector = _Warnings()
    config_logger = logging.getLogger("convlock.config")
    config_logger.addHandler(collector)
    propagate, config_logger.propagate = config_logger.propagate, False
    try:
        store = builder(block)  # builds without connecting
    except ConfigError as exc:
        report.problems.append(str(exc))
        return None
    finally:
        config_logger.removeHandler(collector)
        config_logger.propagate = propagate
    report.warnings.extend(collector.messages)
    built[section] = store
    close = getattr(store, "aclose", None)
    if close is not None:
        asyncio.run(close())
    if report.type != "redis":
        return None
    settings: RedisSettings = parse_settings(model, block, section=section)
    return settings


async def _probe(section: str, settings: RedisSettings) -> dict[str, Any]:
    """Connect to the Redis of ``settings``: version, mode, TLS, round trip; raise on failure."""
    from redis.asyncio.cluster import RedisCluster

    from .redis.connection import create_client, describe

    client = create_client(settings, retries=0)
    try:
        async with asyncio.timeout(settings.socket_timeout * 3):
            if isinstance(client, RedisCluster):
                await client.initialize()
                node = client.get_default_node()
                info = await client.info("server", target_nodes=node)
                nodes = len(client.get_nodes())
            else:
                info = await client.info("server")
                nodes = 1
            rtts = []
            for _ in range(PINGS):
                start = time.perf_counter()
                await client.ping()
                rtts.append(time.perf_counter() - start)
    finally:
        await client.aclose()
    server_mode = str(info.get("redis_mode", "standalone"))
    mode = {"standard": "standalone", "sentinel": "Sentinel", "cluster": "Cluster"}[settings.deployment_mode]
    result: dict[str, Any] = {
        "target": describe(settings),
        "version": str(info.get("redis_version", "unknown")),
        "mode": mode,
        "server_mode": server_mode,
        "tls": settings.use_ssl,
        "round_trip_ms": round(statistics.median(rtts) * 1000, 3),
        "nodes": nodes,
    }
    if settings.deployment_mode == "standard" and server_mode == "cluster":
        result["warning"] = (
            f"{section}.deployment_mode: the server is a Redis Cluster node; set deployment_mode: cluster"
        )
    return result


async def _probe_lock_script(settings: LockStoreSettings) -> None:
    from .redis import RedisLockStore

    async with RedisLockStore.from_settings(settings) as store:
        await store.inspect(PROBE_CONVERSATION)


def check(path: str, *, connect: bool = True) -> tuple[list[BlockReport], list[str]]:
    """Validate (and optionally reach) every block of ``path``: the reports and file-level notes.

    Raises ``ConfigError`` when the file itself cannot be read or parsed.
    """
    config = load_endpoints(path)
    notes = [
        f"section {name!r} is not used by convlock (ignored)" for name in config if name not in KNOWN_SECTIONS
    ]
    reports = []
    built: dict[str, object] = {}
    for section in KNOWN_SECTIONS:
        report = BlockReport(section)
        reports.append(report)
        if section not in config:
            report.type = "in_memory"
            report.warnings.append(f"no {section}: block; the in-memory default is used")
        settings = _validate(section, config.get(section), report, built)
        if settings is None or not connect:
            continue
        from redis.exceptions import AuthenticationError, RedisError, ResponseError

        from .redis.connection import describe

        try:
            report.redis = asyncio.run(_probe(section, settings))
            if section == "lock_store":
                assert isinstance(settings, LockStoreSettings)
                asyncio.run(_probe_lock_script(settings))
                report.redis["lock_script"] = "ok"
        except (AuthenticationError, ResponseError) as exc:  # it answered, and said no
            report.problems.append(f"{section}: {describe(settings)} refused: {_reason(exc)}")
        except (LockError, ConnectionError, TimeoutError, OSError, RedisError) as exc:
            report.problems.append(f"{section}: cannot reach {describe(settings)}: {_reason(exc)}")
        except Exception as exc:  # anything else the client raised, still reported per block
            report.problems.append(f"{section}: {describe(settings)} refused: {_reason(exc)}")
        if report.redis and "warning" in report.redis:
            report.warnings.append(report.redis["warning"])
    if len(built) == len(KNOWN_SECTIONS):
        # The server's own refusals of blocks that are valid alone but not together.
        from .server.options import ServerOptions, _check_combination

        try:
            _check_combination(ServerOptions(), built["lock_store"], built["tracker_store"])
        except ConfigError as exc:
            reports[-1].problems.append(str(exc))
    return reports, notes


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, TimeoutError) and not text:
        return "no answer in time (socket_timeout)"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _secrets(path: str) -> list[str]:
    try:
        config = load_endpoints(path)
    except ConfigError:
        return []
    return [
        str(block["password"])
        for block in config.values()
        if isinstance(block, Mapping) and isinstance(block.get("password"), str | int)
    ]


def format_text(path: str, reports: list[BlockReport], notes: list[str]) -> str:
    """The report for a person."""
    lines = []
    for report in reports:
        status = "ok" if report.ok else "INVALID"
        lines.append(f"{report.section}: {status} (type {report.type})")
        lines.extend(f"  error: {problem}" for problem in report.problems)
        lines.extend(f"  warning: {warning}" for warning in report.warnings)
        if report.redis:
            r = report.redis
            lines.append(f"  {r['target']}")
            lines.append(
                f"  Redis {r['version']}, mode {r['mode']}"
                + (f" ({r['nodes']} nodes)" if r["mode"] == "Cluster" else "")
                + f", TLS {'on' if r['tls'] else 'off'}, round trip {r['round_trip_ms']:.2f} ms"
                + (", lock scripts ok" if r.get("lock_script") == "ok" else "")
            )
    lines.extend(f"note: {note}" for note in notes)
    verdict = "ok" if all(report.ok for report in reports) else "has errors"
    lines.append(f"{path}: {verdict}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Check ``args.file``; print the report; 0 when all is well, 2 otherwise."""
    secrets = _secrets(args.file)
    try:
        reports, notes = check(args.file, connect=not args.no_connect)
    except ConfigError as exc:
        print(redact(f"convlock check-config: {exc}", secrets), file=sys.stderr)
        return 2
    ok = all(report.ok for report in reports)
    if args.json:
        text = json.dumps(
            {"file": args.file, "ok": ok, "blocks": [r.as_dict() for r in reports], "notes": notes},
            ensure_ascii=False,
        )
    else:
        text = format_text(args.file, reports, notes)
    print(redact(text, secrets))
    return 0 if ok else 2
