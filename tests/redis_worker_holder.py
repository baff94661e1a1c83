"""Worker process for the crash test: take a lock, report the ticket, then hang until killed.

Run as ``python redis_worker_holder.py URL PREFIX CONVERSATION LIFETIME``;
prints ``held TICKET`` once the lock is granted. Its lease is renewed by the
store while the process lives, so only its death lets the next waiter in.
"""

from __future__ import annotations

import asyncio
import sys

from convlock.redis import RedisLockStore


async def run(url: str, prefix: str, conversation_id: str, lifetime: float) -> None:
    store = RedisLockStore(url, key_prefix=prefix, lifetime=lifetime, socket_timeout=2)
    async with store.lock(conversation_id) as held:
        print(f"held {held.ticket}", flush=True)
        await asyncio.Event().wait()  # until SIGKILL


def main() -> None:
    url, prefix, conversation_id, lifetime = sys.argv[1:5]
    asyncio.run(run(url, prefix, conversation_id, float(lifetime)))


if __name__ == "__main__":
    main()
