"""The Lua scripts that change a conversation's lock state on Redis, one per operation.

Why Lua: every change to a conversation (draw a ticket, release, renew,
withdraw, revoke) reads the state and writes it back. Done as separate
commands, two processes interleave and lose updates, which is exactly how
the spec's framework double-grants and strands waiters. A script runs
atomically on the server, and it is one round trip: an uncontended acquire
is one ``EVALSHA`` and a release is another.

Why ``TIME``: leases are measured on the Redis server's clock, read inside
the script, so hosts with different wall clocks agree on when a lease ends.
Clients send durations (lease lengths in microseconds), never instants.

The scripts mirror :mod:`convlock.tickets`:

* FIFO: the queue is a sorted set scored by ticket number; the lowest live
  ticket is the holder (``h`` in the state hash).
* Lapsed tickets are skipped: any script that looks at the queue first drops
  leading tickets whose lease ended (:func:`serve` in the prelude).
* The lease restarts at grant: a waiter's lease is its keep-alive while it
  waits; when it is granted, its lease starts afresh for its full length.
* Waiting tickets carry leases too, unlike in memory: a waiter's process can
  die, and its ticket must not block the queue for ever. Waiters renew them.
* Fencing: a ticket is ``max(last + 1, now_us)``
  (:func:`~convlock.tickets.next_fencing_token`), and an idle conversation's
  counter is deleted only once ``now_us > last``
  (:func:`~convlock.tickets.may_forget`); until then it is kept alone, with a
  PEXPIRE that ends just after the clock passes it.
* No leaks: both keys of a conversation expire a margin after the furthest
  lease (``x``), and are deleted outright when the queue empties.

Keys (see :mod:`convlock.redis_keys`): ``KEYS[1]`` is the queue, ``KEYS[2]``
the state hash, and ``ARGV[1]`` the prefix of the per-ticket wake-up lists.
The wake-up lists are not declared in ``KEYS`` because their names depend on
the ticket granted, which only the script knows; they share the hash tag of
the declared keys, so Redis Cluster sees a single slot.

Numbers: tickets are microseconds since the epoch (about 1.8e15), exact in
Lua's doubles up to 2^53. Lua would print them as ``1.8e+15``, so every
number written to Redis or compared as a string goes through ``fmt``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

__all__ = [
    "ALL",
    "CHECK",
    "FORCE_RELEASE",
    "INSPECT",
    "ISSUE",
    "KEY_TTL_MARGIN_MS",
    "RELEASE",
    "RENEW",
    "SWEEP",
    "LuaScript",
]

#: How long a conversation's keys outlive its furthest lease. Only matters
#: when every owner died; otherwise keys are deleted when the queue empties.
KEY_TTL_MARGIN_MS = 1000


@dataclass(frozen=True)
class LuaScript:
    """One named script: its full source (prelude included) and SHA1 for ``EVALSHA``."""

    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


# Shared by every script. Defines the keys, the server clock and the two
# rules every script must apply: ``cover`` (keys outlive leases) and
# ``serve`` (the lowest live ticket holds; lapsed ones are dropped).
_PRELUDE = """
local q, s, wake = KEYS[1], KEYS[2], ARGV[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

local function fmt(n)
  return string.format('%.0f', n)
end

-- Let both keys live until MARGIN after a lease ending at `ends`. `x`
-- remembers the furthest end, so this costs one HGET when nothing changes.
local function cover(ends)
  local x = tonumber(redis.call('HGET', s, 'x') or '0')
  if ends > x then
    local ms = math.ceil((ends - now) / 1000) + MARGIN
    redis.call('HSET', s, 'x', fmt(ends))
    redis.call('PEXPIRE', s, ms)
    redis.call('PEXPIRE', q, ms)
  end
end

-- The queue is empty: delete the conversation. Keep the ticket counter
-- alone while the clock has not passed it (tickets.may_forget), expiring
-- just after it does, so the next ticket still comes out higher.
local function forget()
  local n = tonumber(redis.call('HGET', s, 'n') or '0')
  redis.call('DEL', s)
  if n >= now then
    redis.call('HSET', s, 'n', fmt(n))
    redis.call('PEXPIRE', s, math.floor((n - now) / 1000) + 2)
  end
end

-- Make the lowest live ticket the holder and return it with its lease end
-- (nil when the queue is empty). Leading tickets whose lease ended are
-- dropped: a holder or waiter that stopped renewing (crashed, hung, or a
-- renew=False holder past its lifetime) must not block the queue. A newly
-- granted ticket's lease restarts now for its full length, and its owner is
-- woken by a push on its own list, except when `own` is that ticket (the
-- caller is its owner and learns from the reply).
local function serve(own)
  local h = redis.call('HGET', s, 'h')
  while true do
    local first = redis.call('ZRANGE', q, 0, 0)[1]
    if not first then
      forget()
      return nil, 0
    end
    local lease = redis.call('HMGET', s, 'e' .. first, 'l' .. first)
    local ends = tonumber(lease[1])
    if ends and ends > now then
      if h ~= first then
        local length = tonumber(lease[2])
        ends = now + length
        redis.call('HSET', s, 'h', first, 'e' .. first, fmt(ends))
        cover(ends)
        if first ~= own then
          local w = wake .. first
          redis.call('RPUSH', w, '1')
          redis.call('PEXPIRE', w, math.ceil(length / 1000) + MARGIN)
        end
      end
      return first, ends
    end
    redis.call('ZREM', q, first)
    redis.call('HDEL', s, 'e' .. first, 'l' .. first)
    redis.call('DEL', wake .. first)
    if h == first then
      redis.call('HDEL', s, 'h')
      h = false
    end
  end
end
""".replace("MARGIN", str(KEY_TTL_MARGIN_MS))


def _script(name: str, body: str) -> LuaScript:
    return LuaScript(name, f"-- convlock: {name}\n{_PRELUDE}\n{body.strip()}\n")


ISSUE = _script(
    "issue",
    """
-- Draw a ticket and take the lock if nobody holds it.
-- ARGV[2]: lease length (us). Returns {ticket, granted 0/1, holder's lease left (us)}.
local length = ARGV[2]
local state = redis.call('HMGET', s, 'n', 'h')
local last = tonumber(state[1])
local t = now
if last and last + 1 > t then
  t = last + 1  -- tickets.next_fencing_token: max(last + 1, now)
end
local ticket = fmt(t)
local ends = now + tonumber(length)
if not state[2] and redis.call('EXISTS', q) == 0 then
  -- Nobody holds it and nobody waits: the fast path.
  redis.call('ZADD', q, ticket, ticket)
  redis.call('HSET', s, 'n', ticket, 'h', ticket, 'e' .. ticket, fmt(ends), 'l' .. ticket, length,
             'x', fmt(ends))
  local ms = math.ceil(tonumber(length) / 1000) + MARGIN
  redis.call('PEXPIRE', q, ms)
  redis.call('PEXPIRE', s, ms)
  return {t, 1, ends - now}
end
redis.call('HSET', s, 'n', ticket, 'e' .. ticket, fmt(ends), 'l' .. ticket, length)
redis.call('ZADD', q, ticket, ticket)
cover(ends)
local head, head_ends = serve(ticket)
if head == ticket then
  return {t, 1, head_ends - now}
end
return {t, 0, head_ends - now}
""".replace("MARGIN", str(KEY_TTL_MARGIN_MS)),
)

RELEASE = _script(
    "release",
    """
-- Withdraw a ticket, held or waiting, and serve the next one: the release
-- at the end of a hold, and the clean-up of a waiter that gave up. A ticket
-- already revoked changes nothing. ARGV[2]: ticket.
-- Returns 1 if the ticket was the holder, else 0.
local ticket = ARGV[2]
local h = redis.call('HGET', s, 'h')
redis.call('DEL', wake .. ticket)
if redis.call('ZREM', q, ticket) == 0 then
  return 0
end
if h == ticket then
  redis.call('HDEL', s, 'h', 'e' .. ticket, 'l' .. ticket)
  serve(nil)
  return 1
end
redis.call('HDEL', s, 'e' .. ticket, 'l' .. ticket)
serve(nil)
return 0
""",
)

CHECK = _script(
    "check",
    """
-- A waiter's periodic look, in case its wake-up was lost or the holder's
-- lease ended: serve the queue, and renew the waiter's own lease.
-- ARGV[2]: ticket. Returns {state, holder's lease left (us)} where state is
-- 1 granted, 0 still waiting (lease renewed), -1 gone (it lapsed).
local ticket = ARGV[2]
local head, head_ends = serve(ticket)
if head == ticket then
  redis.call('DEL', wake .. ticket)  -- a push made before this look
  return {1, head_ends - now}
end
local length = redis.call('HGET', s, 'l' .. ticket)
if not length then
  return {-1, 0}
end
local ends = now + tonumber(length)
redis.call('HSET', s, 'e' .. ticket, fmt(ends))
cover(ends)
return {0, head_ends - now}
""",
)

RENEW = _script(
    "renew",
    """
-- A holder's keep-alive (ARGV[3] = '1') or check (ARGV[3] = '0'). The
-- queue is served first, so a lease that already ended is not revived.
-- ARGV[2]: ticket. Returns 1 while the ticket holds, else 0.
local ticket = ARGV[2]
local head = serve(ticket)
if head ~= ticket then
  return 0
end
if ARGV[3] == '1' then
  local ends = now + tonumber(redis.call('HGET', s, 'l' .. ticket))
  redis.call('HSET', s, 'e' .. ticket, fmt(ends))
  cover(ends)
end
return 1
""",
)

INSPECT = _script(
    "inspect",
    """
-- A snapshot: {ticket, lease left (us), ...} in queue order, holder first;
-- empty when idle. Waiters whose lease ended are left out (they would be
-- dropped when they reach the front).
local head = serve(nil)
if not head then
  return {}
end
local out = {}
for _, t in ipairs(redis.call('ZRANGE', q, 0, -1)) do
  local ends = tonumber(redis.call('HGET', s, 'e' .. t))
  if ends and (t == head or ends > now) then
    out[#out + 1] = t
    out[#out + 1] = ends - now
  end
end
return out
""",
)

FORCE_RELEASE = _script(
    "force_release",
    """
-- An operator's revocation of the holder, whatever its lease; the next
-- ticket is served. Returns the revoked ticket, or nil when idle.
local head = serve(nil)
if not head then
  return false
end
redis.call('ZREM', q, head)
redis.call('HDEL', s, 'h', 'e' .. head, 'l' .. head)
redis.call('DEL', wake .. head)
serve(nil)
return head
""",
)

SWEEP = _script(
    "sweep",
    """
-- Serve the queue (dropping lapsed tickets, deleting an idle conversation);
-- 1 if someone holds it afterwards, else 0. Used by conversations().
if serve(nil) then
  return 1
end
return 0
""",
)

ALL: tuple[LuaScript, ...] = (ISSUE, RELEASE, CHECK, RENEW, INSPECT, FORCE_RELEASE, SWEEP)
"""Every script, for loading them all at once (``SCRIPT LOAD``)."""
