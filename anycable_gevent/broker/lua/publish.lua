-- Register one message of one stream: its offset, its epoch, its history entry; publish it.
--
-- KEYS[1] meta hash P{S}:m (e = epoch, s = last offset)
-- KEYS[2] history stream P{S}:h (entries <offset>-0 with fields d = data, t = unix seconds)
-- KEYS[3] pub/sub channel P{S}:c (declared so that the script stays on the stream's slot)
-- ARGV[1] a fresh epoch, used only if the stream has none (its counter is gone)
-- ARGV[2] data    ARGV[3] unix seconds    ARGV[4] history limit (0 = store nothing)
-- ARGV[5] history TTL (s)    ARGV[6] meta TTL (s)
-- ARGV[7] pub/sub head (the message JSON without position and closing brace; '' = no PUBLISH)
-- Returns {offset, epoch}.
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  -- A new epoch: no entry with a reused offset may survive from the old one.
  epoch = ARGV[1]
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch)
end
local offset = redis.call('HINCRBY', KEYS[1], 's', 1)
redis.call('EXPIRE', KEYS[1], ARGV[6])
local limit = tonumber(ARGV[4])
if limit > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', limit, offset .. '-0', 'd', ARGV[2], 't', ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
if ARGV[7] ~= '' then
  redis.call('PUBLISH', KEYS[3], ARGV[7] .. ',"offset":' .. offset .. ',"epoch":"' .. epoch .. '"}')
end
return {offset, epoch}
