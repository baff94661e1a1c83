"""The controller of a verify run: set up, start workers, inject faults, collect, check.

Design
------
The controller owns everything that is not a worker: the private Redis
(:mod:`.spawn`), the fault schedule (:mod:`.faults`), the worker processes
and their replacements, the progress line, and, once the workers have
stopped, the observations the checker needs besides the history (register
values, leftover keys). It never locks anything itself; it only builds the
store once, before any worker starts, to turn a bad ``lock_store:`` block or
an unreachable Redis into a usage error (exit 2) rather than a run full of
errors.

Isolation from real data: the Redis store's ``key_prefix`` gets
``:verify:<run id>:lock`` appended and the register lives under
``:verify:<run id>:register``, so a run on a shared Redis touches only keys
it made, and the leftover-key check sees only this run's keys. Registers are
deleted at the end; lock keys delete themselves (that is what is checked).

Trade-offs: a kill or pause "while holding" is done by asking the worker to
stop itself with SIGSTOP at its next grant (SIGUSR2), because a process seen
holding from outside may have released by the time a signal lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import LockStoreSettings, RedisSettings, load_endpoints, parse_settings
from ..errors import ConfigError, LockStoreUnavailable
from ..factory import create_lock_store
from .checker import CheckParams, CheckResult, Outcome, check
from .faults import HOSTILE_IDS, PlannedFault, plan_faults
from .history import CANCEL, EXIT, FAILOVER, KILL, PAUSE, REGISTER, RESTART, Event, read_events
from .spawn import SpawnedRedis, SpawnedSentinel, SpawnError

__all__ = ["RunResult", "UsageError", "VerifyOptions", "run_verify"]

#: Tasks per worker process: enough that most conversations have a queue.
TASKS_PER_WORKER = 3
#: Seconds added to the liveness bound for a loaded machine's scheduling noise.
LIVENESS_SLACK = 2.0
#: A paused holder stays stopped this much longer than its lease.
PAUSE_PAST_LEASE = 0.5
#: How long to wait for a worker asked to stop at its next grant (it honours the request for 1.5 s).
STOP_WAIT = 2.0
#: How long a spawned Redis stays down during a restart.
RESTART_DOWN = 0.3
#: socket_timeout for a spawned Redis: a restart must not stall calls for the default 10 s.
SPAWNED_SOCKET_TIMEOUT = 2.0


class UsageError(Exception):
    """A bad command line or configuration, or an unreachable store: exit 2 with this message."""


@dataclass(slots=True)
class VerifyOptions:
    """The ``convlock verify`` command line, parsed."""

    endpoints: Path | None = None
    spawn: bool = False
    sentinel: bool = False  # with spawn: a master, a replica and three Sentinels
    processes: int = 8
    conversations: int = 16
    duration: float = 30.0
    lifetime: float = 2.0
    faults: tuple[str, ...] = ()
    seed: int | None = None
    tasks: int = TASKS_PER_WORKER
    history: Path | None = None
    progress: Callable[[str, bool], None] | None = None


@dataclass(slots=True)
class RunResult:
    """What a run produced: the verdict, the history and how the run was set up."""

    result: CheckResult
    events: list[Event]
    options: VerifyOptions
    seed: int
    store: str
    target: str
    wait_timeout: float
    plan: list[PlannedFault]
    elapsed: float
    outcome: Outcome
    phases: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class _Setup:
    block: dict[str, Any]
    kind: str  # in_memory | redis | the dotted class path
    register: dict[str, Any] | None  # worker config of the register, None for in-process
    redis_settings: RedisSettings | None  # where the register (and a redis store) live
    lock_prefix: str | None  # a redis store's key prefix for this run
    target: str
    wait_timeout: float


_FORKSERVER: Any = None


def _context() -> Any:
    """The forkserver that starts workers: it imports convlock once, so each worker starts in
    milliseconds instead of a second or more of imports (ten processes on a busy machine)."""
    global _FORKSERVER
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(
            ["convlock.verify.workers", "convlock.redis", "convlock.redis.connection"]
        )
    return _FORKSERVER


class _Child:
    """A worker process, with the part of ``subprocess.Popen``'s interface the controller uses."""

    def __init__(self, process: Any) -> None:
        self.process = process
        self.pid: int = process.pid

    def poll(self) -> int | None:
        code: int | None = self.process.exitcode
        return code

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired("worker", timeout or 0)
        return self.poll()


@dataclass(slots=True)
class _WorkerProc:
    slot: int
    generation: int
    id: str
    popen: _Child
    events: Path


@dataclass(slots=True)
class _Controller:
    options: VerifyOptions
    setup: _Setup
    run_dir: Path
    seed: int
    conversations: list[str]
    spawned: SpawnedRedis | SpawnedSentinel | None
    workers: dict[int, _WorkerProc] = field(default_factory=dict)
    retired: list[_WorkerProc] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    rng: random.Random = field(default_factory=random.Random)
    busy: set[int] = field(default_factory=set)  # slots under a pause or kill now
    restarting: asyncio.Lock = field(default_factory=asyncio.Lock)
    offsets: dict[Path, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {"grant": 0, "error": 0, "lost": 0})

    def record(self, event: Event) -> None:
        self.events.append(event)

    # -- workers

    def start_worker(self, slot: int, generation: int) -> _WorkerProc:
        worker_id = f"w{slot}.{generation}"
        events = self.run_dir / f"{worker_id}.jsonl"
        config = {
            "worker": worker_id,
            "events": str(events),
            "block": self.setup.block,
            "register": self.setup.register,
            "conversations": self.conversations,
            "tasks": self.options.tasks,
            "lifetime": self.options.lifetime,
            "wait_timeout": self.setup.wait_timeout,
            "seed": self.seed * 1_000 + slot * 10 + generation,
        }
        config_path = self.run_dir / f"{worker_id}.json"
        config_path.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
        from .workers import process_main

        process = _context().Process(
            target=process_main,
            args=(str(config_path), str(self.run_dir / f"{worker_id}.log")),
            name=f"convlock-verify-{worker_id}",
            daemon=True,
        )
        process.start()
        popen = _Child(process)
        proc = _WorkerProc(slot, generation, worker_id, popen, events)
        self.workers[slot] = proc
        return proc

    def worker_log(self, proc: _WorkerProc) -> str:
        try:
            text = (self.run_dir / f"{proc.id}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-12:])

    # -- faults

    async def inject(self, plan: list[PlannedFault], started: float) -> None:
        """Start each planned fault at its time; faults run side by side, one at a time per worker."""
        running: list[asyncio.Task[None]] = []
        try:
            for fault in plan:
                delay = started + fault.at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if time.monotonic() > started + 0.85 * self.options.duration:
                    break  # too late: a fault now would still be running when workers stop
                running.append(asyncio.create_task(self.inject_one(fault)))
            await asyncio.gather(*running)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def inject_one(self, fault: PlannedFault) -> None:
        if fault.kind == "failover":
            if isinstance(self.spawned, SpawnedSentinel):
                async with self.restarting:
                    began = time.monotonic()
                    try:
                        await asyncio.to_thread(self.spawned.failover)
                    except SpawnError as exc:
                        print(f"convlock verify: a failover did not complete: {exc}", file=sys.stderr)
                        return
                    self.record(Event(began, FAILOVER, end=time.monotonic()))
            return
        if fault.kind == "restart":
            if isinstance(self.spawned, SpawnedRedis):
                async with self.restarting:
                    down = time.monotonic()
                    await asyncio.to_thread(self.spawned.restart, RESTART_DOWN)
                    self.record(Event(down, RESTART, end=time.monotonic()))
            return
        proc = await self.ready_worker(fault.worker)
        if proc is None:
            return
        if fault.kind == "cancel":
            # Half the workers at once, so that some task is surely waiting.
            ready = [p for p in self.workers.values() if p.popen.poll() is None and _ready(p)]
            others = [p for p in ready if p is not proc and p.slot not in self.busy]
            chosen = [proc, *self.rng.sample(others, max(0, min(len(others), len(ready) // 2 - 1)))]
            for target in chosen:
                self.record(Event(time.monotonic(), CANCEL, worker=target.id, pid=target.popen.pid))
                _signal(target, signal.SIGUSR1)
            return
        self.busy.add(proc.slot)
        try:
            if fault.kind == "pause":
                await self.pause(proc)
            elif fault.kind == "kill":
                await self.kill(proc, holding=fault.holding)
        finally:
            self.busy.discard(proc.slot)

    async def ready_worker(self, slot: int) -> _WorkerProc | None:
        """The worker in ``slot``, or another ready one if it is still starting (a replacement)."""
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            proc = self.workers.get(slot)
            if proc is not None and proc.popen.poll() is None and _ready(proc) and slot not in self.busy:
                return proc
            ready = [
                p
                for p in self.workers.values()
                if p.popen.poll() is None and _ready(p) and p.slot not in self.busy
            ]
            if ready:
                return self.rng.choice(ready)
            await asyncio.sleep(0.05)
        return None

    async def stop_while_holding(self, proc: _WorkerProc) -> bool:
        """Ask ``proc`` to stop itself at its next grant; True once it has."""
        _signal(proc, signal.SIGUSR2)
        return await _wait_stopped(proc.popen.pid, STOP_WAIT)

    async def pause(self, proc: _WorkerProc) -> None:
        asked = time.monotonic()
        holding = await self.stop_while_holding(proc)
        if not holding:
            _signal(proc, signal.SIGSTOP)
            await _wait_stopped(proc.popen.pid, 1.0)
        try:
            await asyncio.sleep(self.options.lifetime + PAUSE_PAST_LEASE)
        finally:
            _signal(proc, signal.SIGCONT)
            self.record(
                Event(
                    asked,
                    PAUSE,
                    worker=proc.id,
                    pid=proc.popen.pid,
                    end=time.monotonic(),
                    detail="holding" if holding else "any",
                )
            )

    async def kill(self, proc: _WorkerProc, *, holding: bool) -> None:
        stopped = holding and await self.stop_while_holding(proc)
        await self._kill_and_record(proc, "holding" if stopped else "any")
        self.retired.append(proc)
        self.start_worker(proc.slot, proc.generation + 1)

    async def _kill_and_record(self, proc: _WorkerProc, detail: str) -> None:
        """SIGKILL ``proc``, wait until it is dead, then record the kill."""
        _signal(proc, signal.SIGKILL)
        await asyncio.to_thread(proc.popen.wait)
        # Timed once it is dead, not before the signal: the checker exempts the
        # requests a worker sent before its kill, and one sent between a time
        # taken before the signal and the signal's delivery was flagged as
        # never answered.
        self.record(Event(time.monotonic(), KILL, worker=proc.id, pid=proc.popen.pid, detail=detail))

    # -- progress

    def tail_counts(self) -> None:
        """Count grants, errors and lost leases in what the workers wrote since the last call."""
        for proc in [*self.workers.values(), *self.retired]:
            offset = self.offsets.get(proc.events, 0)
            try:
                with proc.events.open("rb") as file:
                    file.seek(offset)
                    chunk = file.read()
            except OSError:
                continue
            end = chunk.rfind(b"\n") + 1
            self.offsets[proc.events] = offset + end
            chunk = chunk[:end]
            self.counts["grant"] += chunk.count(b'"kind":"grant"')
            self.counts["error"] += chunk.count(b'"kind":"error"')
            self.counts["lost"] += chunk.count(b'"kind":"lost"')

    def fault_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for event in self.events:
            if event.kind in (KILL, PAUSE, CANCEL, RESTART) and event.detail != "shutdown":
                counts[event.kind] = counts.get(event.kind, 0) + 1
        return counts

    # -- the end

    async def stop_workers(self) -> None:
        procs = [proc for proc in self.workers.values() if proc.popen.poll() is None]
        for proc in procs:
            _signal(proc, signal.SIGCONT)
            _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10.0 + self.options.lifetime
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proc.popen.wait, max(0.0, deadline - time.monotonic()))
            if proc.popen.poll() is None:
                # It did not stop in time: kill it so the run ends; the checker
                # then treats its unfinished requests like a killed worker's.
                await self._kill_and_record(proc, "shutdown")
        self.retired.extend(self.workers.values())
        self.workers.clear()

    def all_events(self) -> list[Event]:
        events = list(self.events)
        for proc in self.retired:
            if proc.events.exists():
                events.extend(read_events(proc.events))
        return events


def _ready(proc: _WorkerProc) -> bool:
    """Whether the worker wrote its ``start`` event, so its signal handlers are in place."""
    try:
        return proc.events.stat().st_size > 0
    except OSError:
        return False


async def _wait_ready(procs: list[_WorkerProc], timeout: float) -> list[_WorkerProc]:
    """Wait until every worker is ready or has exited; return those that exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_ready(proc) or proc.popen.poll() is not None for proc in procs):
            break
        await asyncio.sleep(0.05)
    return [proc for proc in procs if proc.popen.poll() is not None or not _ready(proc)]


def _signal(proc: _WorkerProc, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        if proc.popen.poll() is None:
            os.kill(proc.popen.pid, signum)


def _is_stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command name, which is in parentheses and may hold spaces.
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] in ("T", "t")


async def _wait_stopped(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _is_stopped(pid):
            return True
        await asyncio.sleep(0.01)
    return False


# -- set-up


def _load_block(options: VerifyOptions) -> dict[str, Any]:
    if options.endpoints is None:
        if not options.spawn:
            raise UsageError(
                "name the lock store to verify: --endpoints FILE (its lock_store: block), or --spawn-redis "
                "to verify the Redis store on a private redis-server"
            )
        return {"type": "redis"}
    config = load_endpoints(options.endpoints)
    block = config.get("lock_store")
    if block is None:
        return {"type": "in_memory"}
    if not isinstance(block, dict):
        raise UsageError(
            f"{options.endpoints}: lock_store: must be a mapping of keys, got {type(block).__name__}"
        )
    return dict(block)


def _connection_settings(block: dict[str, Any]) -> dict[str, Any]:
    """The Redis connection keys of a block, for the register."""
    keys = set(RedisSettings.model_fields) | {"url", "host"}
    return {key: value for key, value in block.items() if key in keys and key not in ("type", "key_prefix")}


def _prepare(options: VerifyOptions, spawned: SpawnedRedis | SpawnedSentinel | None, run_id: str) -> _Setup:
    block = _load_block(options)
    raw_kind = block.get("type")
    kind = "in_memory" if raw_kind is None else str(raw_kind).strip()
    custom = "." in kind
    if not custom and kind not in ("in_memory", "redis"):
        # Let the factory word the error, as `convlock run` does.
        create_lock_store(block)
    if kind == "in_memory" and options.processes > 1:
        raise UsageError(
            f"--processes {options.processes}: the in_memory lock store lives inside one process, so "
            "separate worker processes would not share it; use --processes 1, or verify a redis store"
        )
    if isinstance(spawned, SpawnedSentinel):
        if kind != "redis":
            raise UsageError(
                f"--spawn-redis sentinel verifies the redis store, but lock_store.type is {kind!r}; use "
                "type: redis, or --spawn-redis for a standalone server"
            )
        for key in ("host", "password", "username", "use_ssl", "ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
            block.pop(key, None)
        block.update(
            url=spawned_host(),
            port=spawned.sentinels[0].port,
            db=block.get("db", 0),
            deployment_mode="sentinel",
            endpoints=spawned.endpoints(),
            sentinel_service=spawned.SERVICE,
        )
        block.setdefault("socket_timeout", SPAWNED_SOCKET_TIMEOUT)
    elif spawned is not None:
        mode = block.get("deployment_mode", "standard")
        if mode not in (None, "standard"):
            raise UsageError(
                "--spawn-redis starts one standalone redis-server, but lock_store.deployment_mode is "
                f"{mode!r}; drop --spawn-redis to verify your own Sentinel or Cluster"
            )
        block.pop("host", None)
        block.pop("endpoints", None)
        # The private server has no password and no TLS.
        for key in ("password", "username", "use_ssl", "ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
            block.pop(key, None)
        block.update(url=spawned_host(), port=spawned.port, db=block.get("db", 0))
        if kind == "redis":
            block.setdefault("socket_timeout", SPAWNED_SOCKET_TIMEOUT)
    base_prefix = str(block.get("key_prefix") or "convlock")
    lock_prefix: str | None = None
    redis_settings: RedisSettings | None = None
    if kind == "redis":
        lock_prefix = f"{base_prefix}:verify:{run_id}:lock"
        block["key_prefix"] = lock_prefix
        settings = parse_settings(LockStoreSettings, block, section="lock_store")
        redis_settings = RedisSettings.model_validate(
            _connection_settings(settings.model_dump(by_alias=False))
        )
    elif spawned is not None or (custom and ("url" in block or "host" in block)):
        redis_settings = parse_settings(RedisSettings, _connection_settings(block), section="lock_store")
    # Build the store once here: a bad block is a usage error before any worker starts.
    store_block = dict(block)
    try:
        settings_wait = block.get("wait_timeout")
        wait_timeout = float(settings_wait) if settings_wait not in (None, "") else 2 * options.lifetime + 1
    except (TypeError, ValueError):
        raise UsageError(
            f"lock_store.wait_timeout: got {block.get('wait_timeout')!r}; give seconds"
        ) from None
    create_lock_store(store_block)  # raises ConfigError naming the key
    if redis_settings is None and options.processes > 1:
        raise UsageError(
            f"--processes {options.processes}: the workers' shared register needs a Redis; give the custom "
            "store's url/port in its block, or add --spawn-redis"
        )
    register = None
    target = "in-process"
    if redis_settings is not None:
        register = {
            "settings": redis_settings.model_dump(mode="json", exclude={"type"}),
            "prefix": f"{base_prefix}:verify:{run_id}:register",
            # Through failovers only what a replica acknowledged counts (see register.py).
            "replicas": 1 if isinstance(spawned, SpawnedSentinel) else 0,
        }
        addresses = ", ".join(f"{host}:{port}" for host, port in redis_settings.addresses())
        target = f"{redis_settings.deployment_mode} Redis at {addresses} (db {redis_settings.db})"
    return _Setup(block, kind, register, redis_settings, lock_prefix, target, wait_timeout)


def spawned_host() -> str:
    """The address a spawned Redis listens on."""
    from .spawn import HOST

    return HOST


async def _preflight(setup: _Setup) -> None:
    """Ping the store and the register's Redis: an unreachable Redis is a usage error, not a failed run."""
    store = create_lock_store(setup.block)
    try:
        await store.ping()
    except LockStoreUnavailable as exc:
        raise UsageError(
            f"{exc}; check lock_store.url/port (and password, use_ssl) in the endpoints file, or use "
            "--spawn-redis to verify on a private redis-server"
        ) from None
    except Exception as exc:  # a custom store may fail its ping any way it likes
        raise UsageError(
            f"lock_store: {setup.kind}.ping() failed ({type(exc).__name__}: {exc}); check the block's keys"
        ) from None
    finally:
        await store.aclose()
    if setup.redis_settings is not None:
        client = _client(setup.redis_settings)
        try:
            async with asyncio.timeout(setup.redis_settings.socket_timeout):
                await client.ping()
        except Exception as exc:
            raise UsageError(
                f"cannot reach the Redis at {setup.target} for verify's register "
                f"({type(exc).__name__}: {exc}); check the block's url/port or use --spawn-redis"
            ) from None
        finally:
            await client.aclose()


def _client(settings: RedisSettings) -> Any:
    from ..redis.connection import create_client

    return create_client(settings)


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\^-" else ch for ch in text)


async def _observe(ctl: _Controller, events: list[Event]) -> Outcome:
    """Read the registers, wait for the store's keys to expire, then delete the registers."""
    setup = ctl.setup
    convs = ctl.conversations
    hostile = frozenset(conv for conv in convs if conv in HOSTILE_IDS)
    if setup.redis_settings is None:
        registers = {event.conv: event.value or 0 for event in events if event.kind == REGISTER}
    else:
        from .register import RedisRegister

        assert setup.register is not None
        register = RedisRegister(_client(setup.redis_settings), setup.register["prefix"])
        try:
            registers = await register.values(convs)
        finally:
            await register.aclose()
    leftover: list[str] | None
    reason = ""
    if setup.kind == "redis":
        assert setup.redis_settings is not None
        assert setup.lock_prefix is not None
        leftover = await _leftover_keys(setup.redis_settings, setup.lock_prefix, ctl.options.lifetime)
    elif setup.kind == "in_memory":
        leftover = []
        for event in events:
            if event.kind == EXIT and event.detail:
                leftover += [f"in-memory conversation {conv!r}" for conv in json.loads(event.detail)]
    else:
        leftover = None
        reason = f"{setup.kind} is not a built-in store: verify does not know its keys"
    if setup.redis_settings is not None and setup.register is not None:
        from .register import RedisRegister

        register = RedisRegister(_client(setup.redis_settings), setup.register["prefix"])
        try:
            await register.delete(convs)
        finally:
            await register.aclose()
    return Outcome(registers=registers, leftover_keys=leftover, leftover_reason=reason, hostile_ids=hostile)


async def _leftover_keys(settings: RedisSettings, prefix: str, lifetime: float) -> list[str]:
    """The lock store's keys of this run, once every lease could have ended (lifetime + 2 s at most)."""
    client = _client(settings)
    deadline = time.monotonic() + lifetime + 2.0
    pattern = _glob_escape(prefix) + ":*"
    try:
        while True:
            keys = [
                key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
                async for key in client.scan_iter(match=pattern, count=1000)
            ]
            if not keys or time.monotonic() > deadline:
                return sorted(keys)
            await asyncio.sleep(0.2)
    finally:
        await client.aclose()


def _progress_line(ctl: _Controller, started: float, duration: float) -> str:
    ctl.tail_counts()
    faults = ctl.fault_counts()
    shown = " ".join(f"{name} {faults.get(name, 0)}" for name in ("kill", "pause", "cancel", "restart"))
    elapsed = min(time.monotonic() - started, duration)
    return (
        f"[{elapsed:5.1f}/{duration:g} s] grants {ctl.counts['grant']}  errors {ctl.counts['error']}  "
        f"lost leases {ctl.counts['lost']}  faults: {shown}"
    )


async def run_verify(options: VerifyOptions) -> RunResult:
    """Run the whole verification; raise :class:`UsageError` for anything that is exit status 2."""
    began = time.monotonic()
    phases: dict[str, float] = {}
    seed = options.seed if options.seed is not None else random.randrange(2**31)
    run_id = os.urandom(4).hex()
    run_dir = Path(tempfile.mkdtemp(prefix="convlock-verify-"))
    spawned: SpawnedRedis | SpawnedSentinel | None = None
    ctl: _Controller | None = None
    try:
        if options.sentinel:
            kind = str(_load_block(options).get("type") or "in_memory").strip()
            if kind != "redis":  # checked before minutes of set-up, not after
                raise UsageError(
                    f"--spawn-redis sentinel verifies the redis store, but lock_store.type is {kind!r}; use "
                    "type: redis, or --spawn-redis for a standalone server"
                )
        if options.spawn:
            try:
                spawned = SpawnedSentinel(run_dir) if options.sentinel else SpawnedRedis(run_dir)
                await asyncio.to_thread(spawned.start)
            except SpawnError as exc:
                raise UsageError(str(exc)) from None
        try:
            setup = _prepare(options, spawned, run_id)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        await _preflight(setup)
        phases["setup"] = time.monotonic() - began
        conversations = [f"verify-{run_id}-{index}" for index in range(options.conversations)]
        if "hostile-ids" in options.faults:
            conversations += list(HOSTILE_IDS)
        ctl = _Controller(options, setup, run_dir, seed, conversations, spawned, rng=random.Random(seed))
        plan = plan_faults(
            seed,
            options.faults,
            duration=options.duration,
            lifetime=options.lifetime,
            processes=options.processes,
        )
        first = [ctl.start_worker(slot, 0) for slot in range(options.processes)]
        failed = await _wait_ready(first, 30.0)
        if failed:
            proc = failed[0]
            raise UsageError(
                f"worker {proc.id} did not start (status {proc.popen.poll()}):\n{ctl.worker_log(proc)}"
            )
        started = time.monotonic()
        phases["workers_start"] = started - began - phases["setup"]
        injector = asyncio.create_task(ctl.inject(plan, started))
        last_shown = 0.0
        while (now := time.monotonic()) < started + options.duration:
            await asyncio.sleep(min(0.25, started + options.duration - now))
            if options.progress is not None and time.monotonic() - last_shown >= 0.5:
                last_shown = time.monotonic()
                options.progress(_progress_line(ctl, started, options.duration), False)
            crashed = [
                proc for proc in ctl.workers.values() if proc.popen.poll() not in (None, -signal.SIGKILL)
            ]
            if crashed and time.monotonic() - started < 5:
                # A worker that dies at once has a set-up problem (say, a store class
                # that imports in this process but not in a fresh one): say so.
                proc = crashed[0]
                raise UsageError(
                    f"worker {proc.id} exited with status {proc.popen.returncode} before it began:\n"
                    f"{ctl.worker_log(proc)}"
                )
        injector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await injector
        await ctl.stop_workers()
        phases["workers_stop"] = time.monotonic() - started - options.duration
        if options.progress is not None:
            options.progress(_progress_line(ctl, started, options.duration), True)
        events = ctl.all_events()
        if options.history is not None:
            options.history.parent.mkdir(parents=True, exist_ok=True)
            with options.history.open("w", encoding="utf-8") as file:
                for event in sorted(events, key=lambda event: event.t):
                    file.write(event.to_json() + "\n")
        mark = time.monotonic()
        outcome = await _observe(ctl, events)
        phases["observe"] = time.monotonic() - mark
        mark = time.monotonic()
        params = CheckParams(lifetime=options.lifetime, wait_timeout=setup.wait_timeout, slack=LIVENESS_SLACK)
        result = check(events, params, outcome)
        phases["check"] = time.monotonic() - mark
        return RunResult(
            result=result,
            events=events,
            options=options,
            seed=seed,
            store=setup.kind,
            target=setup.target,
            wait_timeout=setup.wait_timeout,
            plan=plan,
            elapsed=time.monotonic() - began,
            phases={name: round(value, 3) for name, value in phases.items()},
            outcome=outcome,
        )
    finally:
        if ctl is not None:
            for proc in ctl.workers.values():
                _signal(proc, signal.SIGCONT)
                _signal(proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=5)
        if spawned is not None:
            spawned.kill()
        shutil.rmtree(run_dir, ignore_errors=True)
