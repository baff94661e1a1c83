"""Worker process for the operations tests: a lock holder or waiter that writes fenced state.

Run as ``python ops_worker.py MODE ENDPOINTS CONVERSATION`` where ENDPOINTS
is an endpoints.yml with Redis ``lock_store:`` and ``tracker_store:``
blocks. Every line it prints is one event:

* ``hold``: take the lock, load the tracker with the ticket (raising the
  fence), print ``held TICKET``; then, on a line ``save`` on stdin, try a
  fenced save with that ticket and print ``saved`` or ``refused FENCE``, and
  ``lost True|False`` from ``held.ensure()``.
* ``wait``: take the lock (waiting as long as it takes), print ``granted
  TICKET``, load the tracker with the ticket and print ``loaded``, then
  release; or print ``revoked`` if an operator revoked the waiting ticket.
"""

from __future__ import annotations

import asyncio
import sys

from convlock.config import load_endpoints
from convlock.errors import LockLostError
from convlock.factory import create_lock_store
from convlock.server.tracker import StaleTicketError
from convlock.server.tracker_factory import create_tracker_store


async def run(mode: str, endpoints: str, conversation_id: str) -> None:
    config = load_endpoints(endpoints)
    locks = create_lock_store(config["lock_store"])
    tracker = create_tracker_store(config["tracker_store"])
    try:
        if mode == "hold":
            async with locks.lock(conversation_id) as held:
                await tracker.load(conversation_id, ticket=held.ticket)
                print(f"held {held.ticket}", flush=True)
                await asyncio.to_thread(sys.stdin.readline)
                try:
                    await tracker.save(conversation_id, ticket=held.ticket, new_events=[], state={"by": "old"})
                    print("saved", flush=True)
                except StaleTicketError as exc:
                    print(f"refused {exc.fence}", flush=True)
                try:
                    await held.ensure()
                    print("lost False", flush=True)
                except LockLostError:
                    print("lost True", flush=True)
        else:
            try:
                async with locks.lock(conversation_id) as held:
                    print(f"granted {held.ticket}", flush=True)
                    await tracker.load(conversation_id, ticket=held.ticket)
                    print("loaded", flush=True)
            except LockLostError:
                print("revoked", flush=True)
    finally:
        await locks.aclose()
        await tracker.aclose()


def main() -> None:
    mode, endpoints, conversation_id = sys.argv[1:4]
    asyncio.run(run(mode, endpoints, conversation_id))


if __name__ == "__main__":
    main()
