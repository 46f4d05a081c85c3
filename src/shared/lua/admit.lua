-- Admits one model request: budget, rpm, rpd, in-flight, all or nothing.
-- KEYS[1] key prefix `{sg}:k:<key_id>`.
-- ARGV key_id, node, res_id, rpm, rpd, cap, hard (1/0), max_inflight, held, ttl_ms,
-- estimate (the request's upper-bound cost, charged if its node dies with it open).
-- ARGV[12] U, the levels above the key (SPEC §7; KEYS[2..U+1] their prefixes, parents
-- nearest first, then the group), then per level: kind ('p' parent | 'g' group), cap (a
-- hard cap as is; a soft one as -2 - cap; -1 none), rpm (-1 none; groups only).
-- Returns {0, month, day, level} need seed (level 0 the key, i the i-th level above) |
-- {1, month, remaining, reset, warning} admitted |
-- (…, now: Redis' clock, the time the request's cost is booked at) |
-- {2, spent, reserved} budget | {3, retry} rpm | {4, retry} rpd | {5} in-flight |
-- {6, spent, level} a level's hard cap | {7, retry, rpm} a group's rpm.
local p = KEYS[1]
local key_id, node, res_id = ARGV[1], ARGV[2], ARGV[3]
local rpm, rpd, cap = opt(ARGV[4]), opt(ARGV[5]), opt(ARGV[6])
local hard = ARGV[7] == '1'
local max_inflight = opt(ARGV[8])
local held = ARGV[9]

local now = now_ms()
local day = math.floor(now / MS_DAY)
local month = month_of_day(day)
local mon = p .. ':mon:' .. month
if redis.call('EXISTS', mon) == 0 then return {0, month, day, 0} end
local ups = tonumber(ARGV[12] or '0')
for i = 1, ups do
  if redis.call('EXISTS', KEYS[1 + i] .. ':mon:' .. month) == 0 then return {0, month, day, i} end
end

-- This key's reservations whose node stopped heart-beating free their slots first.
local rx = p .. ':rx'
for _, f in ipairs(redis.call('ZRANGEBYSCORE', rx, '-inf', now, 'LIMIT', 0, 64)) do
  reap_one(f)
end

local live = p .. ':live'
local warning = 0
if cap then
  local spent = redis.call('HGET', mon, 'spent') or '0'
  if hard then
    -- The key's own spend and holds, and those of the keys it minted (`tree`, `treserved`).
    local reserved = tonumber(redis.call('HGET', live, 'reserved') or '0')
      + tonumber(redis.call('HGET', live, 'treserved') or '0')
    spent = tonumber(spent) + tonumber(redis.call('HGET', mon, 'tree') or '0')
    if spent + reserved + tonumber(held) > cap then
      return {2, spent, reserved}
    end
  elseif tonumber(spent) >= cap then
    warning = 1
  end
end

local minute = p .. ':min'
local n = 0
if rpm then
  redis.call('ZREMRANGEBYSCORE', minute, '-inf', now - MS_MIN)
  n = redis.call('ZCARD', minute)
  if n >= rpm then return {3, reset_secs(minute, n, rpm, now, 1)} end
end

local daykey = p .. ':day:' .. day
if rpd then
  if tonumber(redis.call('GET', daykey) or '0') >= rpd then
    return {4, math.max(1, math.ceil(((day + 1) * MS_DAY - now) / 1000))}
  end
end

if max_inflight then
  if tonumber(redis.call('HGET', live, 'inflight') or '0') >= max_inflight then
    return {5}
  end
end

-- The levels above: each hard cap (a parent's counts its whole tree), a group's rpm.
for i = 1, ups do
  local up = KEYS[1 + i]
  local kind, ucap, urpm = ARGV[10 + 3 * i], opt(ARGV[11 + 3 * i]), opt(ARGV[12 + 3 * i])
  local umon = up .. ':mon:' .. month
  if ucap then
    local ulive = up .. ':live'
    local used = tonumber(redis.call('HGET', umon, 'spent') or '0')
      + tonumber(redis.call('HGET', umon, 'tree') or '0')
      + tonumber(redis.call('HGET', ulive, 'reserved') or '0')
      + tonumber(redis.call('HGET', ulive, 'treserved') or '0')
    if used + tonumber(held) > ucap then return {6, used, i} end
  end
  -- A soft cap above the key (-2 - cap: see redis.rs) that its group or tree has reached.
  local soft = tonumber(ARGV[11 + 3 * i])
  if soft <= -2 and tonumber(redis.call('HGET', umon, 'spent') or '0')
      + tonumber(redis.call('HGET', umon, 'tree') or '0') >= -2 - soft then
    warning = 1
  end
  if kind == 'g' and urpm then
    local umin = up .. ':min'
    redis.call('ZREMRANGEBYSCORE', umin, '-inf', now - MS_MIN)
    local un = redis.call('ZCARD', umin)
    if un >= urpm then return {7, reset_secs(umin, un, urpm, now, 1), urpm} end
  end
end

-- Every check passed: consume the minute, the day, the hold and the slot.
local f = node .. ':' .. res_id
-- The hold is taken at every level above too ('treserved' at a parent, 'reserved' at a
-- group), and the levels are written into the reservation so its release finds them.
local levels = {}
for i = 1, ups do
  local up, kind = KEYS[1 + i], ARGV[10 + 3 * i]
  if held ~= '0' then
    redis.call('HINCRBY', up .. ':live', kind == 'p' and 'treserved' or 'reserved', held)
  end
  if kind == 'g' then
    redis.call('ZADD', up .. ':min', now, f)
    redis.call('PEXPIRE', up .. ':min', MS_MIN)
  end
  levels[#levels + 1] = kind .. up
end
if rpm then
  redis.call('ZADD', minute, now, f)
  redis.call('PEXPIRE', minute, MS_MIN)
else
  -- Keys without an rpm keep no window, only this minute's count for the usage report.
  local rmin = p .. ':rmin:' .. math.floor(now / MS_MIN)
  redis.call('INCR', rmin)
  redis.call('PEXPIRE', rmin, 2 * MS_MIN)
end
if redis.call('INCR', daykey) == 1 then redis.call('PEXPIRE', daykey, 2 * MS_DAY) end
if held ~= '0' then redis.call('HINCRBY', live, 'reserved', held) end
redis.call('HINCRBY', live, 'inflight', 1)

local exp = now + tonumber(ARGV[10])
redis.call('HSET', RES, f,
  held .. '|' .. ARGV[11] .. '|' .. month .. '|' .. key_id .. '|' .. table.concat(levels, ' '))
redis.call('ZADD', RESX, exp, f)
redis.call('ZADD', rx, exp, f)
redis.call('SADD', '{sg}:node:' .. node, f)

local remaining, reset = -1, 0
if rpm then
  remaining = rpm - n - 1
  if remaining <= 0 then
    remaining = 0
    reset = reset_secs(minute, n + 1, rpm, now, 0)
  end
end
return {1, month, remaining, reset, warning, now}
