-- Keep sessions present in one stream until a later deadline (only those still present).
--
-- KEYS: as presence_join.lua (pz, ps, pi, pc)
-- ARGV[1] deadline    ARGV[2] TTL of the keys (s)    ARGV[3..] sids
-- Returns how many of the sessions are present.
local n = 0
for i = 3, #ARGV do
  -- XX: a session whose presence expired (or left) is not brought back
  n = n + redis.call('ZADD', KEYS[1], 'XX', 'GT', 'CH', ARGV[1], ARGV[i])
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  for i = 1, 4 do
    redis.call('EXPIRE', KEYS[i], ARGV[2])
  end
end
return n
