"""The Lua scripts of :class:`~convlock.server.redis_tracker.RedisTrackerStore`, built from named pieces.

A message costs two scripts on the conversation's hash slot: ``LOAD`` (raise
the fence, check the message ID, read the conversation) and ``SAVE`` (check
the fence, append events, save state, remember the message ID with its
reply). Each script is assembled from pieces so that a later step can splice
the same pieces into the lock store's scripts (one combined script in, one
out) without rewriting them:

=====================  ==================================================
piece                  job
=====================  ==================================================
``FENCE_RAISE``        read the head; refuse a stale ticket, else raise the fence (load)
``MESSAGE_ID_LOOKUP``  return the stored reply of a remembered message ID
``READ_RECORD``        refresh TTLs; return the head and the last ``window`` events (load)
``FENCE_CHECK``        read the fence and counts; refuse a stale ticket (save)
``APPEND_AND_SAVE``    append events, replace state, record the ticket, in one write
``MESSAGE_ID_REMEMBER``  remember ID -> reply; forget the oldest past the bound
``TOUCH_TTL``          refresh the TTL of every key the save used
=====================  ==================================================

Pieces share locals and read named arguments; every script first copies
``KEYS``/``ARGV`` into the locals listed in its header, so a piece never
depends on argument positions. A piece may ``return`` (a refusal or a
replay): it then ends the script. The fence pieces read the hash's head
once (``head``), which the pieces after them use: inside a script each
``redis.call`` costs Redis several microseconds of its own besides the
command's work (measured with SLOWLOG on Redis 7.0: a script's time grows
by 5-6 µs per call), so a message's two scripts read and write each hash
once where they can.

Keys (all share the conversation's hash tag ``{E}``, hence one Cluster slot):

* ``record``: ``P:tracker:{E}``, hash of ``fence``, ``ticket``, ``state``,
  ``n`` (events ever appended), ``u`` (user turns stored) and ``e:<i>`` per
  event, of which only the last ``retain`` are kept (each append past the
  bound deletes the one ``retain`` places back: O(1) per event);
* ``ids``: ``P:tracker:{E}:ids``, hash of message ID -> reply (JSON text);
* ``order``: ``P:tracker:{E}:ido``, list of the remembered IDs, oldest
  first, so that forgetting the oldest is one ``LPOP``: remembering costs
  O(1) whatever the bound, and the two ``ids`` keys never hold more than
  ``remember`` entries.

Replies: ``{0, fence}`` a stale ticket; ``{1, fence, ticket, state, n, u,
{events...}}`` a load (the last ``window`` events, oldest first, null where
retention dropped one; a load reads O(window) whatever the conversation's
length); ``{2, reply}`` a remembered
message ID; ``{1, n}`` a save's event count.

``CONFIRM`` serves the replay path when saves must reach replicas: it
rewrites the fence to itself, a no-op that still propagates, so a ``WAIT``
sent right after it on the same connection confirms that everything the
master held when the replay was read, the remembered ID included, has
reached the replicas.
"""

from __future__ import annotations

__all__ = [
    "APPEND_AND_SAVE",
    "CONFIRM",
    "EVENTS",
    "PEEK",
    "FENCE_CHECK",
    "FENCE_RAISE",
    "LOAD",
    "MESSAGE_ID_LOOKUP",
    "MESSAGE_ID_REMEMBER",
    "READ_RECORD",
    "SAVE",
    "TOUCH_TTL",
    "load_locals",
    "save_locals",
]

# -- load: KEYS record, ids, order; ARGV ticket, ttl_ms, message_id ('' for none), window


def load_locals(keys_at: int, args_at: int, ticket_text: str) -> str:
    """The locals the load pieces read: the three keys from ``KEYS[keys_at]`` on,
    ``ttl``, ``message_id`` and ``window`` from ``ARGV[args_at]`` on, and the
    ticket from the Lua expression ``ticket_text`` (its decimal text)."""
    k, a = keys_at, args_at
    return f"""
local record, ids, order = KEYS[{k}], KEYS[{k + 1}], KEYS[{k + 2}]
local ttl, message_id, window = tonumber(ARGV[{a}]), ARGV[{a + 1}], tonumber(ARGV[{a + 2}])
local ticket_text = {ticket_text}
local ticket = tonumber(ticket_text)
"""


# Event i's field is 'e:<i>', named by format(EVENT, i), not 'e:' .. i: Lua
# turns a number into text as a double ('%.14g') before concatenating, and
# 100 names cost a script 22 us that way against 13 us (SLOWLOG medians,
# Redis 7.0, interleaved), the largest part of a load's window after the
# events' own bytes. event_names(from, to) names a run of them, for one HMGET.
_FORMAT = """
local format, EVENT = string.format, 'e:%d'
"""
_EVENT_NAMES = _FORMAT + """
local function event_names(from, to)
  local names, k = {}, 0
  for i = from, to do
    k = k + 1
    names[k] = format(EVENT, i)
  end
  return names
end
"""

_LOAD_HEADER = load_locals(1, 2, "ARGV[1]")

# Restart the TTL of every key of the conversation, when it has one: it is in use.
_TOUCH = """
if ttl > 0 then
  redis.call('PEXPIRE', record, ttl)
  redis.call('PEXPIRE', ids, ttl)
  redis.call('PEXPIRE', order, ttl)
end
"""

# The hash's head: fence, ticket, state, n (events ever appended), u (user turns).
_READ_HEAD = """
local head = redis.call('HMGET', record, 'fence', 'ticket', 'state', 'n', 'u')
"""

#: A ticket below the fence is refused; a higher one raises it. Reads the
#: head for READ_RECORD.
FENCE_RAISE = _READ_HEAD + """
local fence_text = head[1] or '0'
if ticket < tonumber(fence_text) then return {0, fence_text} end
if ticket > tonumber(fence_text) then
  redis.call('HSET', record, 'fence', ticket_text)
  head[1] = ticket_text
end
"""

#: A message ID the conversation remembers ends the load with its reply.
MESSAGE_ID_LOOKUP = (
    """
if message_id ~= '' then
  local reply = redis.call('HGET', ids, message_id)
  if reply then
"""
    + _TOUCH
    + """
    return {2, reply}
  end
end
"""
)

# The head and the last `window` events, the events as one nested array:
# HMGET's reply goes back as it came instead of being copied into the outer
# table (EVALSHA's usec_per_call on Redis 7.0, 100 events of 153 bytes:
# 82 -> 75 us). What is left is mostly Lua's: every string that enters a
# script is hashed whole (a 13 kB argument costs 24 us), and each event's
# name is one more string. Events dropped by retention come back as nil (a
# null bulk), which the reader skips.
_READ_WINDOW = _EVENT_NAMES + """
local n = tonumber(head[4] or '0')
local events = {}
if n > 0 and window > 0 then
  events = redis.call('HMGET', record, unpack(event_names(math.max(1, n - window + 1), n)))
end
return {1, head[1] or '0', head[2] or '0', head[3] or '', n, head[5] or '', events}
"""

#: The head (FENCE_RAISE read it) and the last `window` events; TTLs restart (the conversation is in use).
READ_RECORD = _TOUCH + _READ_WINDOW

LOAD = _LOAD_HEADER + FENCE_RAISE + MESSAGE_ID_LOOKUP + READ_RECORD

# -- peek: a plain read (no fence, no TTL refresh). KEYS record; ARGV window

PEEK = """
local record, window = KEYS[1], tonumber(ARGV[1])
""" + _READ_HEAD + _READ_WINDOW

# -- events: one page. KEYS record; ARGV after, limit, retain. Returns {n, events...}

EVENTS = _EVENT_NAMES + """
local record = KEYS[1]
local after, limit, retain = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local n = tonumber(redis.call('HGET', record, 'n') or '0')
local from = math.max(after + 1, n - retain + 1, 1)
local to = math.min(n, from + limit - 1)
local out = {n}
if to >= from then
  for _, event in ipairs(redis.call('HMGET', record, unpack(event_names(from, to)))) do
    if event then out[#out + 1] = event end
  end
end
return out
"""

# -- save: KEYS record, ids, order; ARGV ticket, ttl_ms, state, message_id ('' for none),
#    reply, remember (the bound), users (user events among the new ones), retain,
#    then the new events (JSON each)


def save_locals(keys_at: int, args_at: int) -> str:
    """The locals the save pieces read: the three keys from ``KEYS[keys_at]`` on,
    the ticket from ``ARGV[1]``, and the save's other arguments (``ttl``,
    ``state``, ..., then the events) from ``ARGV[args_at]`` on."""
    k, a = keys_at, args_at
    return f"""
local record, ids, order = KEYS[{k}], KEYS[{k + 1}], KEYS[{k + 2}]
local ticket_text, ttl, state = ARGV[1], tonumber(ARGV[{a}]), ARGV[{a + 1}]
local message_id, reply, remember = ARGV[{a + 2}], ARGV[{a + 3}], tonumber(ARGV[{a + 4}])
local users, retain = tonumber(ARGV[{a + 5}]), tonumber(ARGV[{a + 6}])
local first_event = {a + 7}
local ticket = tonumber(ticket_text)
"""


_SAVE_HEADER = save_locals(1, 2)

#: A ticket below the fence is refused, and nothing is written. Reads the
#: counts (n, u) for APPEND_AND_SAVE.
FENCE_CHECK = """
local head = redis.call('HMGET', record, 'fence', 'n', 'u')
local fence_text = head[1] or '0'
if ticket < tonumber(fence_text) then return {0, fence_text} end
"""

#: Events are appended one field each, and each drops the one `retain` places
#: back: a save costs what the message added, never the conversation's length.
#: Everything is written in one HSET (and one HDEL when retention drops events);
#: the HDEL comes after, so an event set and dropped in one save ends deleted.
APPEND_AND_SAVE = _FORMAT + """
local n = tonumber(head[2] or '0')
local fields = {'fence', ticket_text, 'ticket', ticket_text, 'state', state}
-- The turn count, kept from the first save on. (A conversation saved before
-- it existed has events but no 'u': the reader counts once and we leave it.)
if head[3] or n == 0 then
  fields[#fields + 1] = 'u'
  fields[#fields + 1] = tonumber(head[3] or '0') + users
end
local dropped = {}
for i = first_event, #ARGV do
  n = n + 1
  fields[#fields + 1] = format(EVENT, n)
  fields[#fields + 1] = ARGV[i]
  if n > retain then
    dropped[#dropped + 1] = format(EVENT, n - retain)
  end
end
fields[#fields + 1] = 'n'
fields[#fields + 1] = n
redis.call('HSET', record, unpack(fields))
if #dropped > 0 then
  redis.call('HDEL', record, unpack(dropped))
end
"""

#: HSETNX: an ID already remembered keeps its first reply and its place.
MESSAGE_ID_REMEMBER = """
if message_id ~= '' and redis.call('HSETNX', ids, message_id, reply) == 1 then
  redis.call('RPUSH', order, message_id)
  if redis.call('LLEN', order) > remember then
    redis.call('HDEL', ids, redis.call('LPOP', order))
  end
end
"""

TOUCH_TTL = _TOUCH + """
return {1, n}
"""

SAVE = _SAVE_HEADER + FENCE_CHECK + APPEND_AND_SAVE + MESSAGE_ID_REMEMBER + TOUCH_TTL

# -- confirm: KEYS record, ids; ARGV message_id. Returns 1 if the ID is still remembered.

CONFIRM = """
local fence_text = redis.call('HGET', KEYS[1], 'fence')
if fence_text then redis.call('HSET', KEYS[1], 'fence', fence_text) end
return redis.call('HEXISTS', KEYS[2], ARGV[1])
"""
