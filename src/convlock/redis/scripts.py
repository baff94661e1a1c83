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

* FIFO: waiters queue in a sorted set scored by ticket number; when the
  holder (``h`` in the state hash) leaves, the lowest live waiter is promoted.
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

Keys (see :mod:`convlock.redis.keys`): ``KEYS[1]`` is the state hash
``P:{E}:s``; the queue ``P:{E}:q`` and the wake-up lists ``P:{E}:w:<T>`` are
named from it inside the script. They are not declared because a wake-up
list's name depends on the ticket granted, which only the script knows, and
declaring one key keeps the hot path's request short; they share the hash
tag of the declared key, so Redis Cluster sees a single slot and routes the
call by it.

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
    "REVOKE",
    "REVOKED_MARK",
    "SWEEP",
    "WITHDRAW",
    "LuaScript",
]

#: How long a conversation's keys outlive its furthest lease. Only matters
#: when every owner died; otherwise keys are deleted when the queue empties.
KEY_TTL_MARGIN_MS = 1000

#: What REVOKE pushes on a revoked waiter's wake-up list instead of a grant's '1'.
REVOKED_MARK = "revoked"


@dataclass(frozen=True)
class LuaScript:
    """One named script: its full source (prelude included) and SHA1 for ``EVALSHA``."""

    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


# Shared by every script. Defines the keys, the server clock and the rules
# every script applies: ``cover`` (keys outlive leases), ``count`` (the
# waiter count that lets the fast paths skip the queue), ``forget`` (an idle
# conversation leaves at most its counter) and ``serve`` (a live holder, or
# the first live waiter promoted; lapsed tickets dropped).
#
# State hash ``s``: n = last ticket issued; h, e, l, o = the holder's
# ticket, lease end, lease length and draw ID; w = number of waiters (absent
# when none); x = the furthest lease end the keys' TTL covers; e<T>, l<T>,
# o<T> = waiter T's lease end, length and draw ID. A draw ID is the caller's
# name for one draw, so that a ticket whose number never reached its caller
# can still be withdrawn (WITHDRAW). Queue ``q``: the waiters only, scored
# by ticket.
# Keeping the holder out of the queue is what makes the uncontended acquire
# and release touch one key with three or four calls each.
_HEADER = """
local s = KEYS[1]
local base = string.sub(s, 1, -2)
local q, wake = base .. 'q', base .. 'w:'
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

local function fmt(n)
  return string.format('%.0f', n)
end
"""

_PRELUDE = """
-- Let both keys live until MARGIN ms after the furthest lease (x). `force`
-- re-applies the TTL even if x did not move: a queue just created has none.
local function cover(ends, force)
  local x = tonumber(redis.call('HGET', s, 'x') or '0')
  if ends > x then
    x = ends
    redis.call('HSET', s, 'x', fmt(x))
  elseif not force then
    return
  end
  local ms = math.ceil((x - now) / 1000) + MARGIN
  redis.call('PEXPIRE', s, ms)
  redis.call('PEXPIRE', q, ms)
end

local function count()
  local waiting = redis.call('ZCARD', q)
  if waiting > 0 then
    redis.call('HSET', s, 'w', waiting)
  else
    redis.call('HDEL', s, 'w')
  end
end

-- Nobody holds or waits: delete the conversation. Keep the ticket counter
-- alone while the clock has not passed it (tickets.may_forget), expiring
-- just after it does, so the next ticket still comes out higher.
local function forget(n)
  n = tonumber(n or redis.call('HGET', s, 'n') or '0')
  redis.call('DEL', s)
  if n >= now then
    redis.call('HSET', s, 'n', fmt(n))
    redis.call('PEXPIRE', s, math.floor((n - now) / 1000) + 2)
  end
end

-- Return the holder and its lease end, promoting the first live waiter if
-- the holder is gone or its lease ended (nil when nobody is left). Lapsed
-- tickets (owners that stopped renewing: crashed, hung, or renew=False
-- past its lifetime) are dropped, so they cannot block the queue. A
-- promoted ticket's lease restarts now for its full length, and its owner
-- is woken by a push on its own list, unless it is `own` (the caller).
local function serve(own)
  local st = redis.call('HMGET', s, 'h', 'e')
  local ends = tonumber(st[2])
  if st[1] and ends > now then
    return st[1], ends
  end
  if st[1] then
    redis.call('HDEL', s, 'h', 'e', 'l', 'o')
  end
  while true do
    local first = redis.call('ZRANGE', q, 0, 0)[1]
    if not first then
      forget(nil)
      return nil, 0
    end
    redis.call('ZREM', q, first)
    local lease = redis.call('HMGET', s, 'e' .. first, 'l' .. first, 'o' .. first)
    redis.call('HDEL', s, 'e' .. first, 'l' .. first, 'o' .. first)
    local waited = tonumber(lease[1])
    if waited and waited > now then
      ends = now + tonumber(lease[2])
      redis.call('HSET', s, 'h', first, 'e', fmt(ends), 'l', lease[2], 'o', lease[3] or '')
      cover(ends, false)
      count()
      if first ~= own then
        local w = wake .. first
        redis.call('RPUSH', w, '1')
        redis.call('PEXPIRE', w, math.ceil(tonumber(lease[2]) / 1000) + MARGIN)
      end
      return first, ends
    end
    redis.call('DEL', wake .. first)
  end
end
""".replace("MARGIN", str(KEY_TTL_MARGIN_MS))


def _script(name: str, body: str, fast: str = "") -> LuaScript:
    # The fast path runs before the helpers are defined, so the common case
    # does not pay for building their closures.
    return LuaScript(name, f"-- convlock: {name}\n{_HEADER}\n{fast.strip()}\n{_PRELUDE}\n{body.strip()}\n")


ISSUE = _script(
    "issue",
    """
redis.call('HSET', s, 'n', ticket, 'e' .. ticket, ends, 'l' .. ticket, length, 'o' .. ticket, draw)
redis.call('ZADD', q, ticket, ticket)
cover(tonumber(ends), not st[3])
local head, head_ends = serve(ticket)
count()
if head == ticket then
  return t
end
return {t, head_ends - now}
""",
    fast="""
-- Draw a ticket; take the lock if nobody holds it or waits.
-- ARGV[1]: lease length (us); ARGV[2]: the caller's draw ID, kept with the
-- ticket (o, o<T>) so that WITHDRAW can find a ticket whose number the
-- caller never learnt. Returns the ticket (an integer) when granted, else
-- {ticket, holder's lease left (us)}: the shortest replies to parse.
local length = ARGV[1]
local draw = ARGV[2] or ''
local st = redis.call('HMGET', s, 'n', 'h', 'w')
local t = now
local last = tonumber(st[1])
if last and last + 1 > t then
  t = last + 1  -- tickets.next_fencing_token: max(last + 1, now)
end
local ticket = fmt(t)
local ends = fmt(now + tonumber(length))
if not st[2] and not st[3] then
  -- The fast path: one key, one write, one TTL.
  redis.call('HSET', s, 'n', ticket, 'h', ticket, 'e', ends, 'l', length, 'o', draw, 'x', ends)
  redis.call('PEXPIRE', s, math.ceil(tonumber(length) / 1000) + MARGIN)
  return t
end
""".replace("MARGIN", str(KEY_TTL_MARGIN_MS)),
)

RELEASE = _script(
    "release",
    """
if st[1] == ticket then
  redis.call('HDEL', s, 'h', 'e', 'l', 'o')
  serve(nil)
  return 1
end
if redis.call('ZREM', q, ticket) == 1 then
  redis.call('HDEL', s, 'e' .. ticket, 'l' .. ticket, 'o' .. ticket)
  count()
  serve(nil)
end
return 0
""",
    fast="""
-- End a hold, or withdraw a waiting ticket (ARGV[2] = '1': also clear its
-- wake-up list, which a grant may have filled just as its owner gave up),
-- and serve the next ticket. A ticket already revoked changes nothing.
-- ARGV[1]: ticket. Returns 1 if the ticket was the holder, else 0.
local ticket = ARGV[1]
if ARGV[2] == '1' then
  redis.call('DEL', wake .. ticket)
end
local st = redis.call('HMGET', s, 'h', 'w', 'n')
if st[1] == ticket and not st[2] then
  -- The fast path: nobody waits, so the conversation goes idle. The
  -- counter stays only while the clock has not passed it (may_forget).
  local n = tonumber(st[3])
  redis.call('DEL', s)
  if n >= now then
    redis.call('HSET', s, 'n', st[3])
    redis.call('PEXPIRE', s, math.floor((n - now) / 1000) + 2)
  end
  return 1
end
""",
)

CHECK = _script(
    "check",
    """
-- A waiter's periodic look, in case its wake-up was lost or the holder's
-- lease ended: serve the queue, and renew the waiter's own lease.
-- ARGV[1]: ticket. Returns {state, holder's lease left (us)} where state is
-- 1 granted, 0 still waiting (lease renewed), -1 gone (it lapsed), -2
-- revoked by an operator.
local ticket = ARGV[1]
local head, head_ends = serve(ticket)
if head == ticket then
  redis.call('DEL', wake .. ticket)  -- a push made before this look
  return {1, head_ends - now}
end
local length = redis.call('HGET', s, 'l' .. ticket)
if not length and redis.call('LINDEX', wake .. ticket, 0) == 'revoked' then
  return {-2, 0}  -- revoked by an operator (REVOKE) while it waited
end
if not length or not head then
  return {-1, 0}
end
local ends = now + tonumber(length)
redis.call('HSET', s, 'e' .. ticket, fmt(ends))
cover(ends, false)
return {0, head_ends - now}
""",
)

RENEW = _script(
    "renew",
    """
-- A holder's keep-alive (ARGV[2] = '1') or check (ARGV[2] = '0'). The
-- queue is served first, so a lease that already ended is not revived.
-- ARGV[1]: ticket. Returns 1 while the ticket holds, else 0.
local ticket = ARGV[1]
local head = serve(ticket)
if head ~= ticket then
  return 0
end
if ARGV[2] == '1' then
  local ends = now + tonumber(redis.call('HGET', s, 'l'))
  redis.call('HSET', s, 'e', fmt(ends))
  cover(ends, false)
end
return 1
""",
)

INSPECT = _script(
    "inspect",
    """
-- A snapshot: {ticket, lease left (us), ...} holder first, then waiters in
-- queue order, then the server time (us), which tells how long each
-- waiter has waited (a ticket is its draw time in us, bar the +1 of
-- next_fencing_token); empty when idle. Waiters whose lease ended are left
-- out (they are dropped when they reach the front).
local head, head_ends = serve(nil)
if not head then
  return {}
end
local out = {head, head_ends - now}
for _, t in ipairs(redis.call('ZRANGE', q, 0, -1)) do
  local ends = tonumber(redis.call('HGET', s, 'e' .. t))
  if ends and ends > now then
    out[#out + 1] = t
    out[#out + 1] = ends - now
  end
end
out[#out + 1] = now
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
redis.call('HDEL', s, 'h', 'e', 'l', 'o')
serve(nil)
return head
""",
)

REVOKE = _script(
    "revoke",
    """
-- An operator's revocation of one ticket: ARGV[1] is the ticket, or '' for
-- whoever holds. The holder is revoked only if it is that ticket, and the
-- next is served; a waiter leaves the queue and finds REVOKED_MARK on its
-- wake-up list instead of a grant. Returns {ticket, 1} for a holder,
-- {ticket, 0} for a waiter, nil when no such live ticket.
local ticket = ARGV[1]
local head = serve(nil)
if not head then
  return false
end
if ticket == '' or ticket == head then
  redis.call('HDEL', s, 'h', 'e', 'l', 'o')
  serve(nil)
  return {head, 1}
end
local length = redis.call('HGET', s, 'l' .. ticket)
if redis.call('ZREM', q, ticket) == 0 or not length then
  return false
end
redis.call('HDEL', s, 'e' .. ticket, 'l' .. ticket, 'o' .. ticket)
count()
local w = wake .. ticket
redis.call('DEL', w)
redis.call('RPUSH', w, 'REVOKED_MARK')
redis.call('PEXPIRE', w, math.ceil(tonumber(length) / 1000) + MARGIN)
return {ticket, 0}
""".replace("REVOKED_MARK", REVOKED_MARK).replace("MARGIN", str(KEY_TTL_MARGIN_MS)),
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

WITHDRAW = _script(
    "withdraw",
    """
-- Withdraw the ticket drawn with draw ID ARGV[1], holding or waiting, and
-- serve the next: for a caller whose draw ran but whose reply was lost (it
-- was cancelled, or timed out, while the reply was on its way). Returns the
-- withdrawn ticket, or nil when no ticket carries that ID.
local draw = ARGV[1]
if draw == '' then
  return false
end
local st = redis.call('HMGET', s, 'h', 'o')
if st[1] and st[2] == draw then
  redis.call('DEL', wake .. st[1])
  redis.call('HDEL', s, 'h', 'e', 'l', 'o')
  serve(nil)
  return st[1]
end
for _, t in ipairs(redis.call('ZRANGE', q, 0, -1)) do
  if redis.call('HGET', s, 'o' .. t) == draw then
    redis.call('ZREM', q, t)
    redis.call('HDEL', s, 'e' .. t, 'l' .. t, 'o' .. t)
    redis.call('DEL', wake .. t)
    count()
    serve(nil)
    return t
  end
end
return false
""",
)

ALL: tuple[LuaScript, ...] = (ISSUE, RELEASE, CHECK, RENEW, INSPECT, FORCE_RELEASE, SWEEP, WITHDRAW, REVOKE)
"""Every script, for loading them all at once (``SCRIPT LOAD``)."""
