"""``convlock locks ls|show|release``: see and repair stuck conversations from a shell.

The commands read the ``lock_store:`` block of the endpoints file
(``--endpoints``, default ``endpoints.yml``) and talk to that store
directly, so they work whether or not a ``convlock run`` server is up: an
operator of any framework that uses convlock's Redis store can use them.

Output: a table for a person, or ``--json`` for scripts. Exit codes: 0 on
success; 1 when the conversation or ticket asked for is not locked; 2 for a
usage or configuration error, including a lock store that cannot be
reached with this configuration. Messages never contain the Redis
password: the store names its server with
:func:`convlock.redis.connection.describe`.

Design: pure formatting (``format_*``) is kept apart from the store calls
so that it can be read and tested on its own. ``ls`` pages through the
store's ``conversations()`` (SCAN in Redis, never KEYS) and stops after
``--limit`` conversations, so its cost follows the number of locked
conversations shown, while the scan itself walks the keyspace in pages.
Open question: ``ls`` inspects each listed conversation with its own
round trip; a pipelined batch would be faster for thousands of locks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from .cli_args import positive_int
from .config import load_endpoints
from .errors import ConfigError, LockError
from .factory import create_lock_store
from .memory import InMemoryLockStore
from .store import LockSnapshot, LockStore

__all__ = ["DEFAULT_ENDPOINTS", "add_parser", "format_show", "format_table", "run", "summary"]

DEFAULT_ENDPOINTS = "endpoints.yml"
DEFAULT_LIMIT = 100

EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE = 0, 1, 2


def add_parser(subparsers: Any) -> None:
    """Register ``locks`` and its actions on the ``convlock`` command's subparsers."""
    locks = subparsers.add_parser(
        "locks",
        help="list, inspect and release conversation locks in the configured store",
        description="See and repair conversation locks in the lock store of an endpoints file. "
        "Exit status: 0 ok, 1 not found, 2 usage or configuration error (or store unreachable).",
    )
    actions = locks.add_subparsers(dest="locks_action", required=True, metavar="ACTION")

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--endpoints",
            default=DEFAULT_ENDPOINTS,
            metavar="FILE",
            help=f"endpoints file with a lock_store: block (default {DEFAULT_ENDPOINTS})",
        )
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")

    ls = actions.add_parser("ls", help="table of locked conversations")
    common(ls)
    ls.add_argument(
        "--limit", type=positive_int, default=DEFAULT_LIMIT, help=f"show at most N (default {DEFAULT_LIMIT})"
    )
    show = actions.add_parser("show", help="one conversation's queue in detail")
    common(show)
    show.add_argument("conversation_id", metavar="ID")
    release = actions.add_parser(
        "release",
        help="revoke the holder (or one ticket) and serve the next waiter",
        description="Atomically revoke the conversation's holder, or with --ticket the ticket N only "
        "(holding or waiting). The next waiter is served at once; the revoked holder's later fenced "
        "writes are refused.",
    )
    common(release)
    release.add_argument("conversation_id", metavar="ID")
    release.add_argument("--ticket", type=positive_int, metavar="N", help="revoke only this ticket")
    locks.set_defaults(func=run)


# -- formatting (pure)


def printable(conversation_id: str) -> str:
    """The ID as typed, or its ``repr`` when it holds characters a terminal would act on."""
    if conversation_id.isprintable() and conversation_id.strip() == conversation_id:
        return conversation_id
    return repr(conversation_id)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def summary(snapshot: LockSnapshot) -> dict[str, Any]:
    """One row of ``ls``: holder, queue length, oldest wait and lease left."""
    waits = [lease.waited for lease in snapshot.waiting if lease.waited is not None]
    return {
        "conversation_id": snapshot.conversation_id,
        "holder_ticket": None if snapshot.serving is None else snapshot.serving.ticket,
        "waiting": len(snapshot.waiting),
        "oldest_wait": max(waits) if waits else None,
        "lease_left": None if snapshot.serving is None else snapshot.serving.expires_in,
    }


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(cells)
        ).rstrip()

    return "\n".join([line(header), *(line(row) for row in rows)])


def format_table(rows: Sequence[dict[str, Any]], *, truncated: bool, limit: int) -> str:
    """The ``ls`` table for a person."""
    if not rows:
        return "no conversation is locked"
    header = ("CONVERSATION", "HOLDER", "WAITING", "OLDEST WAIT", "LEASE LEFT")
    cells = [
        (
            printable(row["conversation_id"]),
            "-" if row["holder_ticket"] is None else str(row["holder_ticket"]),
            str(row["waiting"]),
            _seconds(row["oldest_wait"]),
            _seconds(row["lease_left"]),
        )
        for row in rows
    ]
    text = _table(header, cells, right={1, 2, 3, 4})
    if truncated:
        text += f"\n(first {limit} shown; use --limit to see more)"
    return text


def format_show(snapshot: LockSnapshot) -> str:
    """The ``show`` detail for a person: the holder, then the queue in serving order."""
    rows = []
    if snapshot.serving is not None:
        rows.append(("holding", str(snapshot.serving.ticket), "-", _seconds(snapshot.serving.expires_in)))
    for position, lease in enumerate(snapshot.waiting, 1):
        rows.append(
            (f"waiting #{position}", str(lease.ticket), _seconds(lease.waited), _seconds(lease.expires_in))
        )
    title = f"conversation {printable(snapshot.conversation_id)}: {len(snapshot.waiting)} waiting"
    return title + "\n" + _table(("STATE", "TICKET", "WAITED", "LEASE LEFT"), rows, right={1, 2, 3})


# -- store calls


def open_store(endpoints: str) -> LockStore:
    """The lock store an endpoints file names; ``ConfigError`` when the CLI cannot reach it."""
    config = load_endpoints(endpoints)
    block = config.get("lock_store")
    store = create_lock_store(block)
    if isinstance(store, InMemoryLockStore):
        raise ConfigError(
            f"{endpoints}: lock_store.type is in_memory (or the block is missing), so the locks live inside "
            "the server process and no other process can see them; use the server's GET /locks and "
            "/status, or configure 'lock_store: {type: redis, ...}'"
        )
    return store


async def _ls(store: LockStore, limit: int) -> tuple[list[dict[str, Any]], bool]:
    rows: list[dict[str, Any]] = []
    truncated = False
    found = store.conversations()
    try:
        async for cid in found:
            if len(rows) >= limit:
                truncated = True
                break
            snapshot = await store.inspect(cid)
            if snapshot is not None:
                rows.append({**summary(snapshot), "queue": snapshot.as_dict()})
    finally:
        # Stop the scan now rather than when the generator is collected.
        close = getattr(found, "aclose", None)
        if close is not None:
            await close()
    # The longest wait first: that is the conversation an operator looks for.
    rows.sort(key=lambda row: (-(row["oldest_wait"] or 0.0), row["conversation_id"]))
    return rows, truncated


async def _main(args: argparse.Namespace) -> int:
    store = open_store(args.endpoints)
    async with store:
        if args.locks_action == "ls":
            rows, truncated = await _ls(store, args.limit)
            if args.json:
                _print_json({"locks": rows, "truncated": truncated})
            else:
                print(format_table(rows, truncated=truncated, limit=args.limit))
            return EXIT_OK
        cid = args.conversation_id
        if args.locks_action == "show":
            snapshot = await store.inspect(cid)
            if args.json:
                _print_json(
                    snapshot.as_dict()
                    if snapshot is not None
                    else {"conversation_id": cid, "serving": None, "waiting": []}
                )
            else:
                print(format_show(snapshot) if snapshot else f"conversation {printable(cid)} is not locked")
            return EXIT_OK if snapshot is not None else EXIT_NOT_FOUND
        # release
        try:
            result = await store.revoke(cid, args.ticket)
        except NotImplementedError as exc:
            raise ConfigError(f"--ticket: {exc}") from None
        after = await store.inspect(cid) if result is not None else None
        serving = None if after is None or after.serving is None else after.serving.ticket
        if args.json:
            _print_json(
                {
                    "conversation_id": cid,
                    "revoked_ticket": None if result is None else result[0],
                    "was_holder": None if result is None else result[1],
                    "serving": serving,
                }
            )
        elif result is None:
            what = f"ticket {args.ticket}" if args.ticket is not None else "no ticket"
            print(f"conversation {printable(cid)}: {what} is holding or waiting; nothing revoked")
        else:
            ticket, holder = result
            role = "the holder" if holder else "a waiting ticket"
            now = "nobody holds it now" if serving is None else f"ticket {serving} holds it now"
            print(f"conversation {printable(cid)}: revoked ticket {ticket} ({role}); {now}")
        return EXIT_OK if result is not None else EXIT_NOT_FOUND


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False))


def run(args: argparse.Namespace) -> int:
    """Run one ``convlock locks`` action; returns the exit status (see the module docstring)."""
    try:
        return asyncio.run(_main(args))
    except ConfigError as exc:
        print(f"convlock locks: {exc}", file=sys.stderr)
    except LockError as exc:
        print(f"convlock locks: {exc}", file=sys.stderr)
    except ValueError as exc:  # an invalid conversation ID
        print(f"convlock locks: {exc}", file=sys.stderr)
    return EXIT_USAGE
