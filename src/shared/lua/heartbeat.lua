-- Pushes the expiry of every open reservation of one node to now + ttl, after settling the
-- node's calls whose outcome it never learnt (a reply lost to a timeout).
-- KEYS[1] `{sg}:node:<node>`. ARGV ttl_ms, node, k, then k res ids whose admission failed
-- (released, nothing charged: the request was not forwarded), then res ids whose settlement
-- failed (no longer extended: they expire and are reaped at their estimate, an upper bound).
-- Returns how many were extended.
keep_tables()
local node, k = ARGV[2], tonumber(ARGV[3])
for i = 4, 3 + k do
  local f = node .. ':' .. ARGV[i]
  unadmit(f)
  unlink(f)
end
for i = 4 + k, #ARGV do redis.call('SREM', KEYS[1], node .. ':' .. ARGV[i]) end

local exp = now_ms() + tonumber(ARGV[1])
local n = 0
for _, f in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('HEXISTS', RES, f) == 1 then
    redis.call('ZADD', RESX, 'XX', exp, f)
    n = n + 1
  else
    -- Reaped by another node meanwhile (this node was silent too long).
    redis.call('SREM', KEYS[1], f)
  end
end
return n
