-- The tracker's SAVE script as convlock shipped it before events moved to a list
-- (commit 98a0887: one hash field e:<i> per event). tests/server/test_tracker_window.py
-- runs it as an older replica would during a rolling upgrade. Do not change it.

local record, ids, order = KEYS[1], KEYS[2], KEYS[3]
local ticket_text, ttl, state = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local message_id, reply, remember = ARGV[4], ARGV[5], tonumber(ARGV[6])
local users, retain = tonumber(ARGV[7]), tonumber(ARGV[8])
local first_event = 9
local ticket = tonumber(ticket_text)

local head = redis.call('HMGET', record, 'fence', 'n', 'u')
local fence_text = head[1] or '0'
if ticket < tonumber(fence_text) then return {0, fence_text} end

local format, EVENT = string.format, 'e:%d'

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

if message_id ~= '' and redis.call('HSETNX', ids, message_id, reply) == 1 then
  redis.call('RPUSH', order, message_id)
  if redis.call('LLEN', order) > remember then
    redis.call('HDEL', ids, redis.call('LPOP', order))
  end
end

if ttl > 0 then
  redis.call('PEXPIRE', record, ttl)
  redis.call('PEXPIRE', ids, ttl)
  redis.call('PEXPIRE', order, ttl)
end

return {1, n}
