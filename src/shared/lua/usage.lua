-- Admits a /v1/usage call: limited by rpm and rpd like a model request, counted apart.
-- KEYS[1] key prefix. ARGV member (unique), rpm, rpd, cap, hard (1/0).
-- Returns {1, remaining, reset, warning} | {3, retry} | {4, retry}.
local p = KEYS[1]
local rpm, rpd, cap = opt(ARGV[2]), opt(ARGV[3]), opt(ARGV[4])
local now = now_ms()
local day = math.floor(now / MS_DAY)

local umin = p .. ':umin'
if rpm then
  redis.call('ZREMRANGEBYSCORE', umin, '-inf', now - MS_MIN)
  local n = redis.call('ZCARD', umin)
  if n >= rpm then return {3, reset_secs(umin, n, rpm, now, 1)} end
end
local uday = p .. ':uday:' .. day
if rpd then
  if tonumber(redis.call('GET', uday) or '0') >= rpd then
    return {4, math.max(1, math.ceil(((day + 1) * MS_DAY - now) / 1000))}
  end
end

if rpm then
  redis.call('ZADD', umin, now, ARGV[1])
  redis.call('PEXPIRE', umin, MS_MIN)
end
if redis.call('INCR', uday) == 1 then redis.call('PEXPIRE', uday, 2 * MS_DAY) end

-- The headers report the model-request window, as in-process (`KeyCounters::standing`).
local remaining, reset = standing(p, rpm, now)
local warning = 0
if cap and ARGV[5] ~= '1' then
  local spent = redis.call('HGET', p .. ':mon:' .. month_of_day(day), 'spent') or '0'
  if tonumber(spent) >= cap then warning = 1 end
end
return {1, remaining, reset, warning}
