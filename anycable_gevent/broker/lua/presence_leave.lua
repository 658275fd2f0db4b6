-- Remove a session from the presence of one stream.
--
-- KEYS: as presence_join.lua (pz, ps, pi, pc)    ARGV[1] sid
-- Returns {1, id} when it was the last session of its id (a leave event), {0, id} when
-- other sessions still hold the id, {-1} when the session is not present.
local pid = redis.call('HGET', KEYS[2], ARGV[1])
if not pid then
  return {-1}
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('HINCRBY', KEYS[4], pid, -1) <= 0 then
  redis.call('HDEL', KEYS[4], pid)
  redis.call('HDEL', KEYS[3], pid)
  return {1, pid}
end
return {0, pid}
