-- Seeds a key's month from the ledger, exactly once: a no-op if the month is already there
-- (another node seeded it first), so seeding is guarded, never additive.
-- KEYS[1] key or group prefix. ARGV month, day, requests_today, expire_at_ms, spent, tree
-- (the month's spend of the keys below a key), then (model, requests, prompt_tokens,
-- completion_tokens, spent) per model.
-- Returns 1 if this call seeded, 0 if the month was already there.
local p = KEYS[1]
local mon = p .. ':mon:' .. ARGV[1]
if redis.call('EXISTS', mon) == 1 then return 0 end
keep_tables()
redis.call('HSET', mon, 'seeded', '1', 'spent', ARGV[5], 'tree', ARGV[6])
for i = 7, #ARGV, 5 do
  local m = ARGV[i]
  redis.call('HSET', mon, 'n:' .. m, ARGV[i + 1], 'p:' .. m, ARGV[i + 2],
    'c:' .. m, ARGV[i + 3], 's:' .. m, ARGV[i + 4])
end
redis.call('PEXPIREAT', mon, ARGV[4])
redis.call('SET', p .. ':day:' .. ARGV[2], ARGV[3], 'NX', 'PX', 2 * MS_DAY)
return 1
