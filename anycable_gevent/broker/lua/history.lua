-- Read one stream's position and history atomically (a registration cannot fall between).
--
-- KEYS[1] meta hash P{S}:m (e = epoch, s = last offset)
-- KEYS[2] history stream P{S}:h
-- ARGV[1] first entry ID to return ('-' = from the oldest)
-- Returns {epoch or false, last offset, entries}: entries as XRANGE gives them.
local meta = redis.call('HMGET', KEYS[1], 'e', 's')
if not meta[1] then
  return {false, 0, {}}
end
return {meta[1], tonumber(meta[2] or 0), redis.call('XRANGE', KEYS[2], ARGV[1], '+')}
