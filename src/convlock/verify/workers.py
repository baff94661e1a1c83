"""A verify worker: one OS process with its own lock store, locking random conversations.

Run by the controller as ``python -m convlock.verify.workers CONFIG.json``.
Each of its tasks loops: draw a random conversation, ``lock()`` it, do a
fenced, non-atomic read-modify-write of the conversation's register (read,
pause a few milliseconds, write the value plus one), release. Every step is
an event in the worker's own history file (:mod:`.history`), written and
flushed before the process goes on, so a SIGKILL loses no event already made.

Inside a hold each event records ``held.lost`` at its time: that is what
tells the checker how long the hold was surely un-lapsed.

Signals, from the controller:

* SIGTERM: stop. Waiting tasks are cancelled, holders release, the store is
  closed and ``exit`` is written.
* SIGUSR1 (the ``cancel`` fault): cancel every task that is waiting for a
  lock; each one writes an ``error`` event with ``error="cancelled"``.
* SIGUSR2: the next task granted within 1.5 s writes ``hold-stop`` and stops
  the whole process with SIGSTOP while it holds the lock; the controller then
  resumes it past its lease (``pause``) or kills it (``kill``). A process
  cannot be stopped "while holding" more precisely from outside.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import RedisSettings, parse_settings
from ..errors import LockError, LockLostError
from ..factory import create_lock_store
from ..store import HeldLock, LockStore
from .history import (
    ERROR,
    EXIT,
    GRANT,
    HOLD_STOP,
    LOST,
    READ,
    REGISTER,
    RELEASE,
    REQUEST,
    START,
    WRITE,
    WRITE_START,
    Event,
    EventWriter,
)
from .register import LocalRegister, RedisRegister, Register

__all__ = ["main"]

#: How long a SIGUSR2 request to stop while holding stays valid (the controller waits longer).
STOP_REQUEST_VALID = 1.5
#: The longest pause between the read and the write of the register.
RMW_GAP = 0.005


def build_register(config: dict[str, Any] | None) -> Register:
    """The register a worker config names: Redis connection settings, or None for in-process."""
    if config is None:
        return LocalRegister()
    from ..redis.connection import create_client

    settings = parse_settings(RedisSettings, config["settings"], section="register")
    return RedisRegister(
        create_client(settings, retries=0), config["prefix"], replicas=config.get("replicas", 0)
    )


class Worker:
    """One worker process's tasks, store, register and history."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.id: str = config["worker"]
        self.writer = EventWriter(Path(config["events"]))
        self.block: dict[str, Any] = config["block"]
        self.register_config: dict[str, Any] | None = config["register"]
        self.conversations: list[str] = config["conversations"]
        self.tasks: int = config["tasks"]
        self.lifetime: float = config["lifetime"]
        self.wait_timeout: float = config["wait_timeout"]
        self.rng = random.Random(config["seed"])
        self.waiting: set[asyncio.Task[None]] = set()
        self.cancelled_by_fault: set[asyncio.Task[None]] = set()
        self.stop_requested_at = -float("inf")
        self.shutting_down = False

    def emit(self, kind: str, **fields: Any) -> None:
        self.writer.write(Event(time.monotonic(), kind, worker=self.id, **fields))

    async def run(self) -> None:
        store = create_lock_store(self.block)
        register = build_register(self.register_config)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, self._cancel_waiters)
        loop.add_signal_handler(signal.SIGUSR2, self._request_stop)
        # Written once the handlers are in place: the controller signals no worker before it.
        self.emit(START, pid=os.getpid())
        tasks = [loop.create_task(self._client(store, register, index)) for index in range(self.tasks)]
        await stop.wait()
        self.shutting_down = True
        for attempt in range(40):
            # Cancel again until every task is done: a cancellation that lands in
            # the middle of a store's clean-up may be absorbed by it.
            for task in tasks:
                task.cancel()
            _, pending = await asyncio.wait(tasks, timeout=0.25)
            if not pending:
                break
            if attempt == 8:
                print(f"worker {self.id}: tasks still running 2 s after SIGTERM:", file=sys.stderr)
                for task in pending:
                    task.print_stack(file=sys.stderr)
        leftover: list[str] = []
        if self.block.get("type", "in_memory") == "in_memory":
            leftover = [conversation async for conversation in store.conversations()]
        if isinstance(register, LocalRegister):
            for conv, value in (await register.values(self.conversations)).items():
                self.emit(REGISTER, conv=conv, value=value)
        await store.aclose()
        await register.aclose()
        self.emit(EXIT, detail=json.dumps(leftover, ensure_ascii=False))
        self.writer.close()

    def _cancel_waiters(self) -> None:
        for task in list(self.waiting):
            self.cancelled_by_fault.add(task)
            task.cancel()

    def _request_stop(self) -> None:
        self.stop_requested_at = time.monotonic()

    async def _client(self, store: LockStore, register: Register, index: int) -> None:
        task = asyncio.current_task()
        assert task is not None
        count = 0
        while not self.shutting_down:
            count += 1
            conv = self.rng.choice(self.conversations)
            req = f"{self.id}:{index}:{count}"
            self.emit(REQUEST, req=req, conv=conv)
            self.waiting.add(task)
            granted = False
            try:
                async with store.lock(conv, lifetime=self.lifetime, wait_timeout=self.wait_timeout) as held:
                    self.waiting.discard(task)
                    granted = True
                    await self._hold(held, register, req, conv)
            except asyncio.CancelledError:
                self.waiting.discard(task)
                by_fault = task in self.cancelled_by_fault
                self.cancelled_by_fault.discard(task)
                if not granted:
                    self.emit(
                        ERROR, req=req, conv=conv, error="cancelled", detail="fault" if by_fault else ""
                    )
                if self.shutting_down or not by_fault:
                    raise
                task.uncancel()
            except LockLostError as exc:
                self.emit(LOST, req=req, conv=conv, detail=str(exc)[:300])
            except LockError as exc:
                self.emit(ERROR, req=req, conv=conv, error=type(exc).__name__, detail=str(exc)[:300])
            except Exception as exc:  # a broken custom store may raise anything: record it, go on
                self.emit(ERROR, req=req, conv=conv, error=type(exc).__name__, detail=str(exc)[:300])
            finally:
                self.waiting.discard(task)
            await asyncio.sleep(self.rng.uniform(0, 0.002))

    async def _hold(self, held: HeldLock, register: Register, req: str, conv: str) -> None:
        ticket = held.ticket
        common: dict[str, Any] = {"req": req, "conv": conv, "ticket": ticket}
        self.emit(GRANT, lost=held.lost, **common)
        try:
            if time.monotonic() - self.stop_requested_at < STOP_REQUEST_VALID:
                self.stop_requested_at = -float("inf")
                self.emit(HOLD_STOP, **common)
                os.kill(os.getpid(), signal.SIGSTOP)  # resumed (or killed) by the controller
            try:
                value, seen = await register.read(conv, ticket)
                self.emit(READ, lost=held.lost, value=value, seen=seen, **common)
                await asyncio.sleep(self.rng.uniform(0, RMW_GAP))  # the non-atomic gap
                self.emit(WRITE_START, lost=held.lost, **common)
                accepted, seen = await register.write(conv, ticket, value + 1)
                self.emit(WRITE, accepted=accepted, seen=seen, **common)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restarting: the write's outcome is unknown
                self.emit(ERROR, error=type(exc).__name__, detail=f"register: {exc}"[:300], **common)
            if held.lost:
                self.emit(LOST, **common)
        finally:
            self.emit(RELEASE, lost=held.lost, **common)


def process_main(config_path: str, log_path: str) -> None:
    """Entry point in a process forked by the controller: output to ``log_path``, then run."""
    with open(log_path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process's own streams)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    main([config_path])


def main(argv: Sequence[str] | None = None) -> int:
    """Run one worker from its JSON config file."""
    args = list(sys.argv[1:] if argv is None else argv)
    config = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    # Like `convlock run`, let a custom store class live in the working directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    asyncio.run(Worker(config).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
