"""The per-conversation register that verify's workers update under the lock.

Each update is a deliberately non-atomic read-modify-write: :meth:`read` in one
round trip, the increment in Python, :meth:`write` in another. Both are
fenced by the lock's ticket, as an application should fence its own data
(``docs/redis.md``): a read raises the register's fence (the highest ticket
seen) to the reader's ticket, and a write is accepted only if its ticket is
still at least the fence. So if two holders ever overlap, the one with the
lower ticket cannot overwrite the other's work: its write is refused.

With a correct fence the register equals the number of writes it accepted,
even when the lock fails (a failover, a paused holder). With a store whose
tickets repeat or go backwards the fence cannot help and writes are lost,
which the checker reports.

The register lives in the same Redis as the lock (its own key prefix, one key
per conversation: a hash with the value ``v`` and the fence ``s``), or, for an
in-memory run without Redis, in the worker process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any, Protocol

__all__ = ["LocalRegister", "RedisRegister", "Register", "Unreplicated", "register_key"]

# Tickets can be microsecond timestamps (~2**51): Lua numbers compare them exactly
# (up to 2**53), but tostring() would print them in exponent form, so the
# scripts store and return the strings they were given.
_READ = """
local stored = redis.call('HGET', KEYS[1], 's') or '0'
if tonumber(ARGV[1]) > tonumber(stored) then
  redis.call('HSET', KEYS[1], 's', ARGV[1])
  stored = ARGV[1]
end
return {redis.call('HGET', KEYS[1], 'v') or '0', stored}
"""
_WRITE = """
local stored = redis.call('HGET', KEYS[1], 's') or '0'
if tonumber(ARGV[1]) >= tonumber(stored) then
  redis.call('HSET', KEYS[1], 'v', ARGV[2], 's', ARGV[1])
  return {1, ARGV[1]}
end
return {0, stored}
"""


def register_key(prefix: str, conversation_id: str) -> str:
    """The register's key: a digest of the ID, in braces so a Cluster keeps it in one slot."""
    digest = hashlib.sha256(conversation_id.encode("utf-8")).hexdigest()[:24]
    return f"{prefix}:{{{digest}}}"


class Register(Protocol):
    """A fenced counter per conversation."""

    async def read(self, conversation_id: str, ticket: int) -> tuple[int, int]:
        """Raise the fence to ``ticket``; return (value, fence)."""

    async def write(self, conversation_id: str, ticket: int, value: int) -> tuple[bool, int]:
        """Set ``value`` if ``ticket`` is at least the fence; return (accepted, fence)."""

    async def values(self, conversation_ids: Iterable[str]) -> dict[str, int]:
        """The current values (0 for a register never written)."""

    async def aclose(self) -> None:
        """Release resources."""


class Unreplicated(Exception):
    """A register command ran on the master but no replica acknowledged it: it may be lost."""


class RedisRegister:
    """The register in Redis, one hash per conversation under ``prefix``.

    With ``replicas`` > 0 every command is followed, on the same connection,
    by ``WAIT replicas``; a command no replica acknowledged raises
    :class:`Unreplicated`, so that only what a failover cannot lose counts:
    a read that was not replicated is not used, and a write that was not
    replicated has an unknown outcome. This is how the register stays exact
    across failovers that the lock itself does not survive.
    """

    def __init__(self, client: Any, prefix: str, *, replicas: int = 0, wait_ms: int = 2000) -> None:
        self._client = client
        self.prefix = prefix
        self.replicas = replicas
        self.wait_ms = wait_ms

    async def _run(self, *command: Any) -> Any:
        if not self.replicas:
            return await self._client.execute_command(*command)
        pipe = self._client.pipeline(transaction=False)
        pipe.execute_command(*command)
        pipe.execute_command("WAIT", self.replicas, self.wait_ms)
        reply, acknowledged = await pipe.execute()
        if int(acknowledged) < self.replicas:
            raise Unreplicated(
                f"{acknowledged} of {self.replicas} replicas acknowledged {command[0]} in time"
            )
        return reply

    async def read(self, conversation_id: str, ticket: int) -> tuple[int, int]:
        """See :meth:`Register.read`."""
        value, seen = await self._run(
            "EVAL", _READ, 1, register_key(self.prefix, conversation_id), str(ticket)
        )
        return int(value), int(seen)

    async def write(self, conversation_id: str, ticket: int, value: int) -> tuple[bool, int]:
        """See :meth:`Register.write`."""
        accepted, seen = await self._run(
            "EVAL", _WRITE, 1, register_key(self.prefix, conversation_id), str(ticket), str(value)
        )
        return bool(int(accepted)), int(seen)

    async def values(self, conversation_ids: Iterable[str]) -> dict[str, int]:
        """See :meth:`Register.values`."""
        out = {}
        for conversation_id in conversation_ids:
            raw = await self._client.hget(register_key(self.prefix, conversation_id), "v")
            out[conversation_id] = int(raw) if raw is not None else 0
        return out

    async def delete(self, conversation_ids: Iterable[str]) -> None:
        """Delete the registers of ``conversation_ids`` (one DEL each: keys may be on any Cluster node)."""
        for conversation_id in conversation_ids:
            await self._client.delete(register_key(self.prefix, conversation_id))

    async def aclose(self) -> None:
        """Close the client."""
        await self._client.aclose()


class LocalRegister:
    """The register in the worker's memory, for in-memory runs with no Redis at all."""

    def __init__(self) -> None:
        self._values: dict[str, int] = {}
        self._seen: dict[str, int] = {}

    async def read(self, conversation_id: str, ticket: int) -> tuple[int, int]:
        """See :meth:`Register.read`."""
        seen = max(self._seen.get(conversation_id, 0), ticket)
        self._seen[conversation_id] = seen
        return self._values.get(conversation_id, 0), seen

    async def write(self, conversation_id: str, ticket: int, value: int) -> tuple[bool, int]:
        """See :meth:`Register.write`."""
        seen = self._seen.get(conversation_id, 0)
        if ticket < seen:
            return False, seen
        self._values[conversation_id] = value
        self._seen[conversation_id] = ticket
        return True, ticket

    async def values(self, conversation_ids: Iterable[str]) -> dict[str, int]:
        """See :meth:`Register.values`."""
        return {conversation_id: self._values.get(conversation_id, 0) for conversation_id in conversation_ids}

    async def aclose(self) -> None:
        """Nothing to release."""
