-- Current counters of one key for GET /v1/usage.
-- KEYS[1] key prefix. ARGV has_rpm (1/0).
-- Returns {0} need seed | {1, month, minute, today, reserved, inflight, HGETALL month}.
local p = KEYS[1]
local now = now_ms()
local day = math.floor(now / MS_DAY)
local month = month_of_day(day)
local mon = p .. ':mon:' .. month
if redis.call('EXISTS', mon) == 0 then return {0} end
local minute
if ARGV[1] == '1' then
  minute = redis.call('ZCOUNT', p .. ':min', '(' .. (now - MS_MIN), '+inf')
else
  minute = tonumber(redis.call('GET', p .. ':rmin:' .. math.floor(now / MS_MIN)) or '0')
end
local today = tonumber(redis.call('GET', p .. ':day:' .. day) or '0')
local live = redis.call('HMGET', p .. ':live', 'reserved', 'inflight')
return {1, month, minute, today, live[1] or '0', live[2] or '0', redis.call('HGETALL', mon)}
