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
  ``n`` (events ever appended), ``u`` (user turns stored), ``b`` and ``l``
  (where the events are, below);
* ``events``: ``P:tracker:{E}:ev``, list of events ``b + 1`` to ``l``,
  oldest first, trimmed to the last ``retain`` (``LTRIM`` only when a push
  passes the bound: O(1) amortized per event). Event ``i`` is at the
  negative index ``i - l - 1`` (-1 is event ``l``), whatever was trimmed,
  so a window is one ``LRANGE -window -1`` and a page needs no ``LLEN``;
* events kept as hash fields ``e:<i>``, as versions before the list did:
  those up to ``b`` (a conversation's events before this version first
  saved it; ``b = 0`` for a new one), and those after ``l``, which an older
  replica still running during a rolling upgrade appended. A save moves the
  ones after ``l`` onto the list first (as many as were appended since the
  last save of this version), so in steady state ``l = n`` and a read is
  the list alone. A record without ``b`` is all fields (``b = l = n``).
  Retention deletes the fields up to ``b`` one for one, as before;
* ``ids``: ``P:tracker:{E}:ids``, hash of message ID -> reply (JSON text);
* ``order``: ``P:tracker:{E}:ido``, list of the remembered IDs, oldest
  first, so that forgetting the oldest is one ``LPOP``: remembering costs
  O(1) whatever the bound, and the two ``ids`` keys never hold more than
  ``remember`` entries.

Why a list for events, not a field each: a field per event costs Redis a
hash entry per event, and a window read by field names costs a name built
in Lua and a lookup per event. Measured on Redis 7.0 (SLOWLOG medians,
interleaved, events of 160 bytes):

* memory of a conversation with 10,000 events: 2.44 MB as fields, 1.71 MB
  as a list (the events' own bytes: 1.64 MB);
* a message of a long conversation (window 100): the in-script 185 -> 141
  us, the out-script 58 -> 70 us (one more call, ``RPUSH``): 243 -> 211 us
  of Redis time per message;
* a message of a 20-message conversation: 143 -> 140 us (unchanged).

Redis's memory and CPU are what every replica shares, so their cost per
conversation and per message is what bounds a deployment.

Replies: ``{0, fence}`` a stale ticket; ``{1, fence, ticket, state, n, u,
{events...}}`` a load (the last ``window`` events, oldest first; null, or
an empty string, where retention dropped a field, which the reader skips;
a load reads O(window) whatever the conversation's length); ``{2, reply}`` a remembered
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

# -- load: KEYS record, events, ids, order; ARGV ticket, ttl_ms, message_id ('' for none), window


def load_locals(keys_at: int, args_at: int, ticket_text: str) -> str:
    """The locals the load pieces read: the four keys from ``KEYS[keys_at]`` on,
    ``ttl``, ``message_id`` and ``window`` from ``ARGV[args_at]`` on, and the
    ticket from the Lua expression ``ticket_text`` (its decimal text)."""
    k, a = keys_at, args_at
    return f"""
local record, events, ids, order = KEYS[{k}], KEYS[{k + 1}], KEYS[{k + 2}], KEYS[{k + 3}]
local ttl, message_id, window = tonumber(ARGV[{a}]), ARGV[{a + 1}], tonumber(ARGV[{a + 2}])
local ticket_text = {ticket_text}
local ticket = tonumber(ticket_text)
"""


# A field-kept event i is 'e:<i>', named by format('e:%d', i), not
# 'e:' .. i: Lua turns a number into text as a double ('%.14g') before
# concatenating, and 100 names cost a script 22 us that way against 13 us
# (SLOWLOG medians, Redis 7.0, interleaved). event_names(from, to) names a
# run of them (none when from > to), for one HMGET or HDEL.
#
# For the same reason every number the pieces hand to redis.call goes as
# format('%d', x) text: Redis 7.0 prints a number argument with '%.17g',
# which cost redis-server 1.25 us more per argument than a string does, and
# the format costs 0.2 us (its CPU, interleaved). Counts, list indices and
# TTLs are integers, so '%d' is exact.
_EVENT_NAMES = """
local format = string.format
local function event_names(from, to)
  local names, k = {}, 0
  for i = from, to do
    k = k + 1
    names[k] = format('e:%d', i)
  end
  return names
end
"""

# read_events(from, to, b, l): events from..to (1 <= from, to <= n) that
# are still kept, oldest first: fields up to b (false where retention
# dropped one), the list (b, l], fields after l. A range inside (b, l], the
# steady state, is one LRANGE; only a range that reaches fields pays for
# their names and more calls.
_READ_EVENTS = _EVENT_NAMES + """
local function read_events(from, to, b, l)
  if from > b and to <= l then
    if from > to then return {} end
    return redis.call('LRANGE', events, format('%d', from - l - 1), format('%d', to - l - 1))
  end
  local out = {}
  local function add(list)
    for _, event in ipairs(list) do out[#out + 1] = event end
  end
  local function fields(lo, hi)
    if lo <= hi then add(redis.call('HMGET', record, unpack(event_names(lo, hi)))) end
  end
  fields(from, math.min(to, b))
  local lo, hi = math.max(from, b + 1), math.min(to, l)
  if lo <= hi then add(redis.call('LRANGE', events, format('%d', lo - l - 1), format('%d', hi - l - 1))) end
  fields(math.max(from, l + 1), to)
  return out
end
"""

_LOAD_HEADER = load_locals(1, 2, "ARGV[1]")

# Restart the TTL of every key of the conversation, when it has one: it is in use.
_TOUCH = """
if ttl > 0 then
  local ms = string.format('%d', ttl)
  redis.call('PEXPIRE', record, ms)
  redis.call('PEXPIRE', events, ms)
  redis.call('PEXPIRE', ids, ms)
  redis.call('PEXPIRE', order, ms)
end
"""

# The hash's head: fence, ticket, state, n (events ever appended), u (user
# turns), b and l (the list holds events b + 1 to l; absent: all are fields).
_READ_HEAD = """
local head = redis.call('HMGET', record, 'fence', 'ticket', 'state', 'n', 'u', 'b', 'l')
"""

#: A ticket below the fence is refused; a higher one raises it. Reads the
#: head for READ_RECORD.
FENCE_RAISE = _READ_HEAD + """
local fence_text = head[1] or '0'
local fence = tonumber(fence_text)
if ticket < fence then return {0, fence_text} end
if ticket > fence then
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
# LRANGE's reply goes back as it came instead of being copied into the outer
# table (EVALSHA's usec_per_call on Redis 7.0, 100 events of 153 bytes:
# 82 -> 75 us when this was an HMGET). What is left is mostly Lua's: every
# string that enters a script is hashed whole (a 13 kB argument costs
# 24 us). Legacy fields dropped by retention come back as nil (a null
# bulk), which the reader skips.
_READ_WINDOW = _READ_EVENTS + """
local n = tonumber(head[4] or '0')
local window_events = {}
if n > 0 and window > 0 then
  window_events = read_events(math.max(1, n - window + 1), n, tonumber(head[6] or n), tonumber(head[7] or n))
end
return {1, head[1] or '0', head[2] or '0', head[3] or '', n, head[5] or '', window_events}
"""

#: The head (FENCE_RAISE read it) and the last `window` events; TTLs restart (the conversation is in use).
READ_RECORD = _TOUCH + _READ_WINDOW

LOAD = _LOAD_HEADER + FENCE_RAISE + MESSAGE_ID_LOOKUP + READ_RECORD

# -- peek: a plain read (no fence, no TTL refresh). KEYS record, events; ARGV window

PEEK = """
local record, events, window = KEYS[1], KEYS[2], tonumber(ARGV[1])
""" + _READ_HEAD + _READ_WINDOW

# -- events: one page. KEYS record, events; ARGV after, limit, retain. Returns {n, events...}

EVENTS = """
local record, events = KEYS[1], KEYS[2]
local after, limit, retain = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
""" + _READ_EVENTS + """
local head = redis.call('HMGET', record, 'n', 'b', 'l')
local n = tonumber(head[1] or '0')
local from = math.max(after + 1, n - retain + 1, 1)
local to = math.min(n, from + limit - 1)
local out = {n}
for _, event in ipairs(read_events(from, to, tonumber(head[2] or n), tonumber(head[3] or n))) do
  if event and event ~= '' then out[#out + 1] = event end
end
return out
"""

# -- save: KEYS record, events, ids, order; ARGV ticket, ttl_ms, state, message_id ('' for none),
#    reply, remember (the bound), users (user events among the new ones), retain,
#    then the new events (JSON each)


def save_locals(keys_at: int, args_at: int) -> str:
    """The locals the save pieces read: the four keys from ``KEYS[keys_at]`` on,
    the ticket from ``ARGV[1]``, and the save's other arguments (``ttl``,
    ``state``, ..., then the events) from ``ARGV[args_at]`` on."""
    k, a = keys_at, args_at
    return f"""
local record, events, ids, order = KEYS[{k}], KEYS[{k + 1}], KEYS[{k + 2}], KEYS[{k + 3}]
local ticket_text, ttl, state = ARGV[1], tonumber(ARGV[{a}]), ARGV[{a + 1}]
local message_id, reply, remember = ARGV[{a + 2}], ARGV[{a + 3}], tonumber(ARGV[{a + 4}])
local users, retain = tonumber(ARGV[{a + 5}]), tonumber(ARGV[{a + 6}])
local first_event = {a + 7}
local ticket = tonumber(ticket_text)
"""


_SAVE_HEADER = save_locals(1, 2)

#: A ticket below the fence is refused, and nothing is written. Reads the
#: counts (n, u) and where the events are (b, l) for APPEND_AND_SAVE.
FENCE_CHECK = """
local head = redis.call('HMGET', record, 'fence', 'n', 'u', 'b', 'l')
local fence_text = head[1] or '0'
if ticket < tonumber(fence_text) then return {0, fence_text} end
"""

#: Events are pushed on the list in one RPUSH, trimmed to the last `retain`
#: only when the push passed it; the head is written in one HSET. A save
#: costs what the message added, never the conversation's length. Fields up
#: to b are deleted one for one as events pass `retain`; fields after l (an
#: older replica's appends) are moved onto the list first.
APPEND_AND_SAVE = _EVENT_NAMES + """
local n = tonumber(head[2] or '0')
local fields = {'fence', ticket_text, 'ticket', ticket_text, 'state', state}
-- The turn count, kept from the first save on. (A conversation saved before
-- it existed has events but no 'u': the reader counts once and we leave it.)
if head[3] or n == 0 then
  fields[#fields + 1] = 'u'
  fields[#fields + 1] = format('%d', tonumber(head[3] or '0') + users)
end
-- The first save by this version: every event so far is a field.
local b, l = tonumber(head[4] or n), tonumber(head[5] or n)
if not head[4] then
  fields[#fields + 1] = 'b'
  fields[#fields + 1] = format('%d', b)
end
-- An older replica appended events l + 1 .. n as fields: they go onto the
-- list first, a thousand at a time (Lua's unpack takes a few thousand
-- values at most). Of a run longer than `retain`, only the last `retain`
-- are kept: the older replica's own retention dropped the rest. A field
-- missing among them (an older replica with a smaller `retain`) goes on as
-- an empty string, which keeps the numbering and which readers skip.
local length = 0
local from = math.max(l + 1, n - retain + 1)
while from <= n do
  local to = math.min(n, from + 999)
  local names = event_names(from, to)
  local moved = redis.call('HMGET', record, unpack(names))
  for i = 1, #names do
    if not moved[i] then moved[i] = '' end
  end
  length = redis.call('RPUSH', events, unpack(moved))
  redis.call('HDEL', record, unpack(names))
  from = to + 1
end
local added = #ARGV - first_event + 1
if added > 0 then
  length = redis.call('RPUSH', events, unpack(ARGV, first_event))
end
if length > retain then
  redis.call('LTRIM', events, format('%d', -retain), '-1')
end
local dropped = event_names(math.max(n + 1 - retain, 1), math.min(n + added - retain, b))
n = n + added
local n_text = format('%d', n)
fields[#fields + 1] = 'n'
fields[#fields + 1] = n_text
fields[#fields + 1] = 'l'
fields[#fields + 1] = n_text
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
