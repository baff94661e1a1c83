"""``convlock bench``: run the scenarios, show progress, write results.json, results.md and plots.

Exit status: 0 when every selected scenario produced figures or a stated
skip (a missed target is reported in the table, not as a failure: these are
measurements, and the machine may be busy); 1 when a scenario failed or
produced nothing; 2 for a bad command line or endpoints file; 130 when
interrupted (Ctrl+C or SIGTERM; every process the run started is stopped).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..verify.spawn import SpawnError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``bench`` on the ``convlock`` command's subparsers."""
    parser = subparsers.add_parser(
        "bench",
        help="measure the locks and the server against baselines, with plots",
        description="Measure convlock against baselines measured in the same run (asyncio.Lock, "
        "Redis round trips, redis-py's Lock, python-redis-lock, a bare ASGI echo, Rasa's lock "
        "stores), in interleaved blocks, and write results.json, results.md and PNG plots.",
    )
    parser.add_argument(
        "--scenarios",
        metavar="LIST",
        help="comma-separated numbers or names (default: all): 1 memory-uncontended, 2 memory-contended, "
        "3 redis-cycle, 4 handoff, 5 throughput, 6 footprint, 7 server, 8 rasa, 9 listing",
    )
    parser.add_argument("--quick", action="store_true", help="small workloads (CI: every scenario, fast)")
    parser.add_argument(
        "--endpoints",
        metavar="FILE",
        help="measure the standalone Redis of this endpoints.yml's lock_store: block "
        "(default: start a private redis-server on a free loopback port)",
    )
    parser.add_argument("--out", metavar="DIR", default="bench-results", help="output folder")
    parser.set_defaults(func=run)


def _target_from_endpoints(path: str) -> Any:
    from ..config import LockStoreSettings, load_endpoints, parse_settings
    from .procs import RedisTarget

    block = load_endpoints(path).get("lock_store")
    if not isinstance(block, dict) or block.get("type") != "redis":
        raise ConfigError(f"{path}: lock_store: set type: redis for convlock bench --endpoints")
    settings = parse_settings(LockStoreSettings, block, section="lock_store")
    if settings.deployment_mode != "standard" or settings.use_ssl:
        raise ConfigError(
            f"{path}: lock_store: convlock bench measures a standalone Redis without TLS; "
            "set deployment_mode: standard and use_ssl: false, or leave out --endpoints"
        )
    return RedisTarget(settings.url, settings.port, settings.db, settings.password, settings.username)


def _machine(target: Any, spawned: bool) -> dict[str, Any]:
    import redis

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load average (1, 5, 15 min) at start": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "redis-py": redis.__version__,
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if "model name" in line), None)
        if model:
            info["cpu"] = model
    except OSError:
        pass
    if target is not None:
        with redis.Redis.from_url(target.url) as client:
            server = client.info("server")
        info["redis-server"] = f"{server.get('redis_version')} on {target.host} " + (
            "(started by this run, no persistence)" if spawned else "(from --endpoints)"
        )
    return info


def run(args: argparse.Namespace) -> int:
    """Run the selected scenarios; see the module docstring for the exit status."""
    from .plots import draw
    from .report import Results
    from .scenarios import Context, select

    try:
        scenarios = select(args.scenarios)
        target = _target_from_endpoints(args.endpoints) if args.endpoints else None
    except (ValueError, ConfigError) as exc:
        print(f"convlock bench: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    results = Results()
    results.titles = {s.name: s.title for s in scenarios}
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="convlock-bench-") as tmp:
        spawned = None
        ctx = Context(quick=args.quick, work=Path(tmp), results=results, target=target)
        try:
            if target is None and any(s.needs_redis for s in scenarios):
                from .procs import spawn_redis

                spawned, ctx.target = spawn_redis(Path(tmp) / "redis")
            results.machine = _machine(ctx.target, spawned is not None)
            results.machine["mode"] = "quick" if args.quick else "full"
            # SIGTERM stops the run like Ctrl+C does: the finally blocks stop every process it started.
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            for scenario in scenarios:
                ctx.progress(f"scenario {scenario.title} ...")
                try:
                    scenario.run(ctx)
                except Exception:
                    failed.append(scenario.name)
                    print(f"convlock bench: scenario {scenario.title} failed:\n{traceback.format_exc()}",
                          file=sys.stderr)
                    continue
                for figure in (f for f in results.figures if f.scenario == scenario.name):
                    ratio = f"  ratio {figure.ratio:.2f}" if figure.ratio is not None else ""
                    mark = {True: "", False: "  (target missed)", None: ""}[figure.met]
                    ctx.progress(f"  {figure.name}: {figure.value:.4g} {figure.unit}{ratio}{mark}")
        except SpawnError as exc:
            print(f"convlock bench: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("convlock bench: interrupted; nothing written", file=sys.stderr)
            return 130
        finally:
            ctx.close()
            if spawned is not None:
                spawned.kill()
    written = results.write(out)
    plots, why = draw(results.series, out)
    print("\n" + results.to_markdown())
    for path in [*written, *plots]:
        print(f"wrote {path}")
    if why:
        print(f"no plots: {why}")
    empty = [n for n in results.scenarios_without_output([s.name for s in scenarios]) if n not in failed]
    if failed or empty:
        print(f"convlock bench: failed: {', '.join(failed + empty)}", file=sys.stderr)
        return 1
    return 0
