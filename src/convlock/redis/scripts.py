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
    "DOORBELL",
    "FORCE_RELEASE",
    "INSPECT",
    "ISSUE",
    "KEY_TTL_MARGIN_MS",
    "MAX_LEASE_US",
    "MIN_LEASE_US",
    "RELEASE",
    "RENEW",
    "REVOKE",
    "REVOKED_MARK",
    "SWEEP",
    "WITHDRAW",
    "LuaScript",
    "issue_script",
    "release_script",
]

#: How long a conversation's keys outlive its furthest lease. Only matters
#: when every owner died; otherwise keys are deleted when the queue empties.
KEY_TTL_MARGIN_MS = 1000

#: What REVOKE pushes on a revoked waiter's wake-up list instead of a grant's 'g'.
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

-- fmt takes integers only. '%d' prints a C long: exact for every integer
-- here (tickets are about 1.8e15, below 2^53) where a long has 64 bits, and
-- it costs Redis 0.2 us a call against 1.0 us for '%.0f', glibc's printing
-- of a double (redis-server's CPU, Redis 7.0); an IN and OUT pair makes
-- four. Where a long has 32 bits (a 32-bit build), '%.0f' as before.
local INTEGER = string.format('%d', 4294967296) == '4294967296' and '%d' or '%.0f'
local function fmt(n)
  return string.format(INTEGER, n)
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
  local ms = fmt(math.ceil((x - now) / 1000) + MARGIN)
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
    redis.call('PEXPIRE', s, fmt(math.floor((n - now) / 1000) + 2))
  end
end

-- Push one wake-up message on ticket t's own list, which only t's waiter
-- reads: 'g' (granted) or 'r<us>' (the holder changed; its lease ends in
-- <us> microseconds: plan the next look by it).
local function push(t, message, ttl_us)
  local w = wake .. t
  redis.call('RPUSH', w, message)
  redis.call('PEXPIRE', w, fmt(math.ceil(ttl_us / 1000) + MARGIN))
end

-- Whether draw ID `o` belongs to the calling store (`tag`, its random
-- draw-ID prefix): that store hands off to its own waiters in-process, so
-- no push is needed, and its owner is known to be alive.
local function mine(o, tag)
  return tag ~= '' and o and string.sub(o, 1, #tag) == tag
end

-- The tag of the store that drew a ticket: its draw ID up to the first ':'.
local function owner(o)
  return o and string.match(o, '^[^:]*:') or ''
end

-- Return the holder and its lease end, promoting the first live waiter if
-- the holder is gone or its lease ended (nil when nobody is left). Lapsed
-- tickets (owners that stopped renewing: crashed, hung, or renew=False
-- past its lifetime) are dropped, so they cannot block the queue.
--
-- A promoted ticket whose owner is known alive (`own`, the caller, or a
-- ticket of the caller's store, `tag`) gets a fresh lease of its full
-- length. Any other keeps the end of its waiting lease, which its live
-- waiter renews every lifetime/3 and its woken owner renews in full: so a
-- waiter that died is never handed a fresh lease, and blocks the queue
-- only until its waiting lease lapses. A promoted ticket is pushed 'g',
-- unless it is own or tag's; the ticket now first in the queue is pushed
-- 'r' so that its waiter re-plans its timer by the new holder's lease.
-- Returns holder, lease end, and the promoted ticket (nil if none).
local function serve(own, tag)
  local st = redis.call('HMGET', s, 'h', 'e')
  local ends = tonumber(st[2])
  if st[1] and ends > now then
    return st[1], ends, nil
  end
  if st[1] then
    redis.call('HDEL', s, 'h', 'e', 'l', 'o')
  end
  while true do
    local first = redis.call('ZRANGE', q, 0, 0)[1]
    if not first then
      forget(nil)
      return nil, 0, nil
    end
    redis.call('ZREM', q, first)
    local lease = redis.call('HMGET', s, 'e' .. first, 'l' .. first, 'o' .. first)
    redis.call('HDEL', s, 'e' .. first, 'l' .. first, 'o' .. first)
    local waited = tonumber(lease[1])
    if waited and waited > now then
      local alive = first == own or mine(lease[3], tag)
      if alive then
        ends = now + tonumber(lease[2])
      else
        ends = waited
      end
      redis.call('HSET', s, 'h', first, 'e', fmt(ends), 'l', lease[2], 'o', lease[3] or '')
      cover(ends, false)
      count()
      -- Whatever its list still holds (a re-plan notice) is stale now.
      redis.call('DEL', wake .. first)
      if not alive then
        push(first, 'g', tonumber(lease[2]))
      end
      -- The next in line re-plans by the new holder's lease, unless the
      -- caller's store or the new holder's own store will tell it.
      local second = redis.call('ZRANGE', q, 0, 0)[1]
      if second then
        local o2 = redis.call('HGET', s, 'o' .. second)
        if not mine(o2, tag) and not mine(o2, owner(lease[3])) then
          push(second, 'r' .. fmt(ends - now), ends - now)
        end
      end
      return first, ends, first
    end
    redis.call('DEL', wake .. first)
  end
end
""".replace("MARGIN", str(KEY_TTL_MARGIN_MS))


def _script(name: str, body: str, fast: str = "", setup: str = "") -> LuaScript:
    # The fast path runs before the helpers are defined, so the common case
    # does not pay for building their closures. `setup` (a companion's code,
    # see issue_script) runs after the header, before the fast path.
    return LuaScript(
        name, f"-- convlock: {name}\n{_HEADER}\n{setup.strip()}\n{fast.strip()}\n{_PRELUDE}\n{body.strip()}\n"
    )


#: Bounds on a lease length, in microseconds, checked in the scripts before
#: any write (the store refuses other lifetimes first, with a clearer error):
#: a longer lease would overflow the integers Redis takes for PEXPIRE, a
#: shorter one could lapse before its reply reaches the caller.
MIN_LEASE_US = 10_000
MAX_LEASE_US = 30 * 24 * 3600 * 1_000_000

_ISSUE_BODY = """
redis.call('HSET', s, 'n', ticket, 'e' .. ticket, ends, 'l' .. ticket, length, 'o' .. ticket, draw)
redis.call('ZADD', q, ticket, ticket)
cover(tonumber(ends), not st[3])
local head, head_ends = serve(ticket, '')
count()
if head == ticket then
  return granted(t)
end
return {t, head_ends - now}
"""

_ISSUE_FAST = (
    """
-- Draw a ticket; take the lock if nobody holds it or waits.
-- ARGV[1]: lease length (us); ARGV[2]: the caller's draw ID, kept with the
-- ticket (o, o<T>) so that WITHDRAW can find a ticket whose number the
-- caller never learnt. Returns granted(ticket) when granted (for plain
-- ISSUE: the ticket, an integer), else {ticket, holder's lease left (us)}:
-- the shortest replies to parse.
local length = ARGV[1]
local span = tonumber(length)
if not span or span % 1 ~= 0 or span < MIN_LEASE or span > MAX_LEASE then
  -- Refused before any write: no key is ever left without a TTL.
  return redis.error_reply('ERR convlock: lease length must be an integer from MIN_LEASE to MAX_LEASE us')
end
local draw = ARGV[2] or ''
local st = redis.call('HMGET', s, 'n', 'h', 'w')
local t = now
local last = tonumber(st[1])
if last and last + 1 > t then
  t = last + 1  -- tickets.next_fencing_token: max(last + 1, now)
end
local ticket = fmt(t)
local ends = fmt(now + span)
if not st[2] and not st[3] then
  -- The fast path: one key, one write, one TTL.
  redis.call('HSET', s, 'n', ticket, 'h', ticket, 'e', ends, 'l', length, 'o', draw, 'x', ends)
  redis.call('PEXPIRE', s, fmt(math.ceil(span / 1000) + MARGIN))
  return granted(t)
end
"""
    .replace("MARGIN", str(KEY_TTL_MARGIN_MS))
    .replace("MIN_LEASE", str(MIN_LEASE_US))
    .replace("MAX_LEASE", str(MAX_LEASE_US))
)


def issue_script(name: str, companion: str) -> LuaScript:
    """ISSUE with a companion: ``companion`` is Lua code that defines ``companion_in(t)``.

    ``companion_in(t)`` runs inside the same atomic script when ticket ``t``
    is granted at once, and the script replies ``{t, 'granted', value}``
    (``value`` must not be nil). A ticket that must wait gets ISSUE's own
    reply, ``{ticket, holder's lease left (us)}``. The companion reads
    ``KEYS[2..]`` and ``ARGV[3..]``; its keys must share the conversation's
    hash tag, so that a Cluster runs the script on one slot.
    """
    hook = f"{companion.strip()}\nlocal function granted(t) return {{t, 'granted', companion_in(t)}} end"
    return _script(name, _ISSUE_BODY, fast=_ISSUE_FAST, setup=hook)


ISSUE = _script("issue", _ISSUE_BODY, fast=_ISSUE_FAST, setup="local function granted(t) return t end")

# The reply of a script that may hand the lock on (RELEASE, WITHDRAW,
# FORCE_RELEASE) when it did not take its fast path: {result, handed, holder,
# holder's lease left (us)}. `handed` is the ticket promoted if it is the
# caller's own (its tag), which was not pushed, so the caller must hand it
# over in-process; else 0. `holder` is whoever holds now (0: nobody), so the
# caller's other waiters can re-plan their timers by its lease.
_HANDOFF_REPLY = """
local function handoff(result, tag)
  local head, head_ends, promoted = serve(nil, tag)
  local handed = 0
  if promoted and head == promoted and mine(redis.call('HGET', s, 'o'), tag) then
    handed = promoted
  end
  if not head then
    return {result, 0, 0, 0}
  end
  return {result, handed, head, head_ends - now}
end
"""

_RELEASE_BODY = _HANDOFF_REPLY + """
if st[1] == ticket then
  redis.call('HDEL', s, 'h', 'e', 'l', 'o')
  return released(handoff(1, tag))
end
if redis.call('ZREM', q, ticket) == 1 then
  redis.call('HDEL', s, 'e' .. ticket, 'l' .. ticket, 'o' .. ticket)
  count()
end
return released(handoff(0, tag))
"""

_RELEASE_FAST = """
-- End a hold, or withdraw a waiting ticket (ARGV[2] = '1': also clear its
-- wake-up list, which a grant may have filled just as its owner gave up),
-- and serve the next ticket. A ticket already revoked changes nothing.
-- ARGV[1]: ticket; ARGV[3]: the caller's tag (draw-ID prefix), whose
-- tickets it hands over itself. Returns released(x) (plain RELEASE: x),
-- where x is 1 when the ticket held and nobody waits, else the hand-off
-- reply (see _HANDOFF_REPLY) whose result is 1 if the ticket was the
-- holder, else 0.
local ticket = ARGV[1]
local tag = ARGV[3] or ''
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
    redis.call('PEXPIRE', s, fmt(math.floor((n - now) / 1000) + 2))
  end
  return released(1)
end
"""


def release_script(name: str, companion: str) -> LuaScript:
    """RELEASE with a companion: ``companion`` is Lua code that defines ``companion_out()``.

    ``companion_out()`` runs first, inside the same atomic script, so it can
    do its own work before the ticket is let go; the script replies ``{x,
    value}``, where ``x`` is RELEASE's own reply (1, or the hand-off reply)
    and ``value`` what ``companion_out()`` returned (absent if nil). The
    companion reads ``KEYS[2..]`` and ``ARGV[4..]``, with keys in the
    conversation's hash slot.
    """
    hook = (
        f"{companion.strip()}\nlocal companion_value = companion_out()\n"
        "local function released(x) return {x, companion_value} end"
    )
    return _script(name, _RELEASE_BODY, fast=_RELEASE_FAST, setup=hook)


RELEASE = _script(
    "release", _RELEASE_BODY, fast=_RELEASE_FAST, setup="local function released(x) return x end"
)

CHECK = _script(
    "check",
    """
-- A waiter's periodic look, in case its wake-up was lost or the holder's
-- lease ended: serve the queue, and renew the waiter's own lease.
-- ARGV[1]: ticket. Returns {state, holder's lease left (us)} where state is
-- 1 granted, 0 still waiting (lease renewed), -1 gone (it lapsed), -2
-- revoked by an operator (REVOKE) while it waited.
local ticket = ARGV[1]
local head, head_ends = serve(ticket, '')
if head == ticket then
  redis.call('DEL', wake .. ticket)  -- a push made before this look
  return {1, head_ends - now}
end
local length = redis.call('HGET', s, 'l' .. ticket)
if not length and redis.call('LINDEX', wake .. ticket, 0) == 'REVOKED_MARK' then
  return {-2, 0}
end
if not length or not head then
  return {-1, 0}
end
local ends = now + tonumber(length)
redis.call('HSET', s, 'e' .. ticket, fmt(ends))
cover(ends, false)
return {0, head_ends - now}
""".replace("REVOKED_MARK", REVOKED_MARK),
)

RENEW = _script(
    "renew",
    """
-- A holder's keep-alive (ARGV[2] = '1') or check (ARGV[2] = '0'). The
-- queue is served first, so a lease that already ended is not revived.
-- ARGV[1]: ticket. Returns 1 while the ticket holds, else 0.
local ticket = ARGV[1]
local head = serve(ticket, '')
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
-- queue order, then the server time (us), which tells how long each waiter
-- has waited (a ticket is its draw time in us, bar the +1 of
-- next_fencing_token); empty when idle. Waiters whose lease ended are left
-- out (they are dropped when they reach the front).
local head, head_ends = serve(nil, '')
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
    _HANDOFF_REPLY
    + """
-- An operator's revocation of the holder, whatever its lease; the next
-- ticket is served. ARGV[1]: the caller's tag. Returns the hand-off reply
-- whose result is the revoked ticket, or 0 when nobody held it.
local tag = ARGV[1] or ''
local head = serve(nil, '')
if not head then
  return {0, 0, 0, 0}
end
redis.call('DEL', wake .. head)
redis.call('HDEL', s, 'h', 'e', 'l', 'o')
return handoff(head, tag)
""",
)

REVOKE = _script(
    "revoke",
    _HANDOFF_REPLY
    + """
-- An operator's revocation of one ticket: ARGV[1] is the ticket, or '' for
-- whoever holds; ARGV[2] the caller's tag. The holder is revoked only if it
-- is that ticket, and the next is served; a waiter leaves the queue and
-- finds REVOKED_MARK on its wake-up list instead of a grant. Returns
-- {ticket, 1, handed, holder, left} for a holder (see _HANDOFF_REPLY),
-- {ticket, 0, 0, 0, 0} for a waiter, {0, 0, 0, 0, 0} when no such ticket.
local ticket = ARGV[1]
local tag = ARGV[2] or ''
local head = serve(nil, '')
if not head then
  return {0, 0, 0, 0, 0}
end
if ticket == '' or ticket == head then
  redis.call('DEL', wake .. head)
  redis.call('HDEL', s, 'h', 'e', 'l', 'o')
  local reply = handoff(head, tag)
  return {reply[1], 1, reply[2], reply[3], reply[4]}
end
local length = redis.call('HGET', s, 'l' .. ticket)
if not length or redis.call('ZREM', q, ticket) == 0 then
  return {0, 0, 0, 0, 0}
end
redis.call('HDEL', s, 'e' .. ticket, 'l' .. ticket, 'o' .. ticket)
count()
local w = wake .. ticket
redis.call('DEL', w)
redis.call('RPUSH', w, 'REVOKED_MARK')
redis.call('PEXPIRE', w, fmt(math.ceil(tonumber(length) / 1000) + MARGIN))
return {ticket, 0, 0, 0, 0}
""".replace("REVOKED_MARK", REVOKED_MARK).replace("MARGIN", str(KEY_TTL_MARGIN_MS)),
)

SWEEP = _script(
    "sweep",
    """
-- Serve the queue (dropping lapsed tickets, deleting an idle conversation);
-- 1 if someone holds it afterwards, else 0. Used by conversations().
if serve(nil, '') then
  return 1
end
return 0
""",
)

WITHDRAW = _script(
    "withdraw",
    _HANDOFF_REPLY
    + """
-- Withdraw the ticket drawn with draw ID ARGV[1], holding or waiting, and
-- serve the next: for a caller whose draw ran but whose reply was lost (it
-- was cancelled, or timed out, while the reply was on its way). ARGV[2]:
-- the caller's tag. Returns the hand-off reply whose result is the
-- withdrawn ticket, or 0 when no ticket carries that ID.
local draw = ARGV[1]
local tag = ARGV[2] or ''
if draw == '' then
  return {0, 0, 0, 0}
end
local st = redis.call('HMGET', s, 'h', 'o')
if st[1] and st[2] == draw then
  redis.call('DEL', wake .. st[1])
  redis.call('HDEL', s, 'h', 'e', 'l', 'o')
  return handoff(st[1], tag)
end
for _, t in ipairs(redis.call('ZRANGE', q, 0, -1)) do
  if redis.call('HGET', s, 'o' .. t) == draw then
    redis.call('ZREM', q, t)
    redis.call('HDEL', s, 'e' .. t, 'l' .. t, 'o' .. t)
    redis.call('DEL', wake .. t)
    count()
    return handoff(t, tag)
  end
end
return {0, 0, 0, 0}
""",
)

DOORBELL = LuaScript(
    "doorbell",
    """-- convlock: doorbell
-- Wake a store's own blocking reader so that it re-arms with a new set of
-- lists: push to its doorbell list (KEYS[1]), which that reader always
-- includes, with a TTL (ARGV[1] ms) so that a doorbell whose reader died
-- does not outlive it.
redis.call('RPUSH', KEYS[1], '1')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
""",
)

ALL: tuple[LuaScript, ...] = (
    ISSUE, RELEASE, CHECK, RENEW, INSPECT, FORCE_RELEASE, REVOKE, SWEEP, WITHDRAW, DOORBELL
)
"""Every script, for loading them all at once (``SCRIPT LOAD``)."""
