-- Remove the sessions of one stream whose presence deadline has passed, atomically, so
-- that of several nodes sweeping at once exactly one gets each leave event.
--
-- KEYS: as presence_join.lua (pz, ps, pi, pc)
-- ARGV[1] now (unix seconds)    ARGV[2] most sessions removed in one call
-- Returns {next deadline or '' when nobody is left, ids that left...}.
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {''}
for _, sid in ipairs(gone) do
  redis.call('ZREM', KEYS[1], sid)
  local pid = redis.call('HGET', KEYS[2], sid)
  if pid then
    redis.call('HDEL', KEYS[2], sid)
    if redis.call('HINCRBY', KEYS[4], pid, -1) <= 0 then
      redis.call('HDEL', KEYS[4], pid)
      redis.call('HDEL', KEYS[3], pid)
      out[#out + 1] = pid
    end
  end
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] then
  out[1] = first[2]
end
return out
