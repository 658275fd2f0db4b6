-- Add a session to a presence id of one stream.
--
-- KEYS[1] P{S}:pz sorted set: sid -> deadline (unix seconds)
-- KEYS[2] P{S}:ps hash: sid -> presence id
-- KEYS[3] P{S}:pi hash: presence id -> info (JSON)
-- KEYS[4] P{S}:pc hash: presence id -> number of sessions holding it
-- ARGV[1] sid    ARGV[2] presence id    ARGV[3] info (JSON)    ARGV[4] deadline
-- ARGV[5] TTL of the keys (s): they vanish by themselves if no node is left to sweep
-- Returns {1} when the id is new in the stream (a join event), {0} when it was present,
-- {-1, held id} when the session is present under another id (nothing changed).
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held and held ~= ARGV[2] then
  return {-1, held}
end
local fresh = 0
if not held then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  if redis.call('HINCRBY', KEYS[4], ARGV[2], 1) == 1 then
    fresh = 1
  end
end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[1], 'GT', ARGV[4], ARGV[1])
for i = 1, 4 do
  redis.call('EXPIRE', KEYS[i], ARGV[5])
end
return {fresh}
