-- Pushes the expiry of every open reservation of one node to now + ttl.
-- KEYS[1] `{sg}:node:<node>`. ARGV ttl_ms. Returns how many were extended.
local exp = now_ms() + tonumber(ARGV[1])
local n = 0
for _, f in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local rec = redis.call('HGET', RES, f)
  if rec then
    local key_id = string.match(rec, '^%d+|%-?%d+|(.*)$')
    redis.call('ZADD', RESX, 'XX', exp, f)
    redis.call('ZADD', '{sg}:k:' .. key_id .. ':rx', 'XX', exp, f)
    n = n + 1
  else
    -- Reaped by another node meanwhile (this node was silent too long).
    redis.call('SREM', KEYS[1], f)
  end
end
return n
