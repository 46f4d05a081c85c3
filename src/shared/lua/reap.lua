-- Reaps up to ARGV[1] expired reservations of any node: released and charged at their
-- estimate (see reap_one). KEYS[1] `{sg}:resx`. Returns how many were reaped.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
for _, f in ipairs(due) do reap_one(f) end
return #due
