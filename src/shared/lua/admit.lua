-- Admits one model request: budget, rpm, rpd, in-flight, all or nothing.
-- KEYS[1] key prefix `{sg}:k:<key_id>`.
-- ARGV key_id, node, res_id, rpm, rpd, cap, hard (1/0), max_inflight, held, ttl_ms,
-- estimate (the request's upper-bound cost, charged if its node dies with it open);
-- for keys with a brake, or with levels above them: hour_cap (-1 none), hour_bound,
-- loop_limit (-1 none), digest.
-- KEYS[2..]: the levels above the key (SPEC §7), parents nearest first, then its group; per
-- level from ARGV[16]: kind ('p' parent | 'g' group), cap (a hard cap as is; a soft one as
-- -2 - cap; -1 none), rpm (-1 none; groups only).
-- Returns {0, month, day, level} need seed (level 0 the key, i the i-th level above) |
-- {1, month, remaining, reset, warning} admitted |
-- (…, now: Redis' clock, the time the request's cost is booked at) |
-- (…, rpm: a group's, whose rolling minute `remaining` and `reset` then describe) |
-- {2, spent, reserved} budget | {3, retry} rpm | {4, retry} rpd | {5} in-flight |
-- {6, hour spend, retry} max_usd_per_hour | {7, retry} loop_limit |
-- {8, spent, level} a level's hard cap | {9, retry, rpm} a group's rpm.
local p = KEYS[1]
local key_id, node, res_id = ARGV[1], ARGV[2], ARGV[3]
local rpm, rpd, cap = opt(ARGV[4]), opt(ARGV[5]), opt(ARGV[6])
local hard = ARGV[7] == '1'
local max_inflight = opt(ARGV[8])
local held = ARGV[9]

local now = now_ms()
local day = math.floor(now / MS_DAY)
local month = month_of_day(day)
-- Each turned into text once (see common.lua), for the keys, the record and Redis.
local now_s, day_s, month_s = string.format('%.0f', now), tostring(day), tostring(month)
local mon = p .. ':mon:' .. month_s
-- Reservations whose node stopped heart-beating free their slots first (the first 64 due,
-- this key's and any other's), and book their estimates, at every level, before any figure
-- below is read.
for _, f in ipairs(redis.call('ZRANGEBYSCORE', RESX, '-inf', now_s, 'LIMIT', '0', '64')) do
  reap_one(f)
end
-- One read per hash: whether the month was seeded, its spend and its tree's (SPEC §7).
local m = redis.call('HMGET', mon, 'seeded', 'spent', 'tree')
if not m[1] then return {0, month, day, 0} end
local ups = #KEYS - 1
-- The levels' months, read once (seeded, spent, tree) before anything is taken.
local umons = {}
for i = 1, ups do
  local um = redis.call('HMGET', KEYS[1 + i] .. ':mon:' .. month_s, 'seeded', 'spent', 'tree')
  if not um[1] then return {0, month, day, i} end
  umons[i] = n0(um[2]) + n0(um[3])
end


local live = p .. ':live'
local warning = 0
if cap then
  local spent = n0(m[2])
  if hard then
    -- The key's own spend and holds, and those of the keys it minted (`tree`, `treserved`).
    local l = redis.call('HMGET', live, 'reserved', 'treserved')
    local reserved = n0(l[1]) + n0(l[2])
    spent = spent + n0(m[3])
    if spent + reserved + (held + 0) > cap then
      return {2, spent, reserved}
    end
  elseif spent >= cap then
    warning = 1
  end
end

-- The levels above: each hard cap (a parent's counts its whole tree), a group's rpm (its
-- rolling minute kept for the reply's rate-limit figures).
local gmin, gn, grpm
for i = 1, ups do
  local up = KEYS[1 + i]
  local kind, ucap, urpm = ARGV[13 + 3 * i], opt(ARGV[14 + 3 * i]), opt(ARGV[15 + 3 * i])
  if ucap then
    local l = redis.call('HMGET', up .. ':live', 'reserved', 'treserved')
    local used = umons[i] + tonumber(l[1] or '0') + tonumber(l[2] or '0')
    if used + tonumber(held) > ucap then return {8, used, i} end
  end
  -- A soft cap above the key (-2 - cap: see redis.rs) that its group or tree has reached.
  local soft = tonumber(ARGV[14 + 3 * i])
  if soft <= -2 and umons[i] >= -2 - soft then
    warning = 1
  end
  if kind == 'g' and urpm then
    local umin = up .. ':min'
    redis.call('ZREMRANGEBYSCORE', umin, '-inf', now - MS_MIN)
    local un = redis.call('ZCARD', umin)
    if un >= urpm then return {9, reset_secs(umin, un, urpm, now, 1), urpm} end
    gmin, gn, grpm = umin, un, urpm
  end
end

-- The runaway-agent brakes, after the budget and before rpm (SPEC §2's order).
local hour_cap = opt(ARGV[12] or '-1')
local hour_bound = ARGV[13] or '0'
local loop_limit = opt(ARGV[14] or '-1')
local hr, hheld, lp
if hour_cap then
  hr = p .. ':hr'
  local mins, h = window(hr, MS_MIN, HOUR_MINUTES * MS_MIN, now, 'r')
  local reserved, settled = 0, 0
  for i = 1, #h, 2 do
    if h[i] == 'r' then reserved = math.max(tonumber(h[i + 1]), 0) end
  end
  for _, b in ipairs(mins) do settled = settled + b[2] end
  local bound = tonumber(hour_bound)
  local committed = settled + reserved
  if committed + bound > hour_cap then
    -- The earliest a retry can be admitted: when enough settled spend leaves for this bound
    -- to fit (open holds may settle, for less, at any moment, so they are not waited out);
    -- 1 s when only open holds are in the way; an hour when the bound alone is above the cap.
    local retry = 1
    if bound > hour_cap then
      retry = HOUR_MINUTES * 60
    elseif settled + bound > hour_cap then
      local left = settled
      for _, b in ipairs(mins) do
        left = left - b[2]
        if left + bound <= hour_cap then
          retry = math.max(1, math.ceil((b[3] - now) / 1000))
          break
        end
      end
    end
    return {6, committed, retry}
  end
  hheld = hour_bound
end
if loop_limit and (ARGV[15] or '') ~= '' then
  lp = p .. ':lp:' .. ARGV[15]
  local secs = window(lp, 1000, LOOP_SECONDS * 1000, now)
  local seen = 0
  for _, b in ipairs(secs) do seen = seen + b[2] end
  if seen >= loop_limit then
    local left, retry = seen, 1
    for _, b in ipairs(secs) do
      left = left - b[2]
      if left < loop_limit then
        retry = math.max(1, math.ceil((b[3] - now) / 1000))
        break
      end
    end
    return {7, retry}
  end
end

local minute = p .. ':min'
local n = 0
if rpm then
  redis.call('ZREMRANGEBYSCORE', minute, '-inf', now - MS_MIN)
  n = redis.call('ZCARD', minute)
  if n >= rpm then return {3, reset_secs(minute, n, rpm, now, 1)} end
end

local daykey = p .. ':day:' .. day_s
if rpd then
  if n0(redis.call('GET', daykey)) >= rpd then
    return {4, math.max(1, math.ceil(((day + 1) * MS_DAY - now) / 1000))}
  end
end

if max_inflight then
  if n0(redis.call('HGET', live, 'inflight')) >= max_inflight then
    return {5}
  end
end

-- Every check passed: consume the minute, the day, the hold and the slot.
local f = node .. ':' .. res_id
-- The hold is taken at every level above too ('treserved' at a parent, 'reserved' at a
-- group), and the levels are written into the reservation so its release finds them.
local levels = {}
for i = 1, ups do
  local up, kind = KEYS[1 + i], ARGV[13 + 3 * i]
  -- Held only where a hard cap reads it; such a level is written in capitals ('P', 'G') so
  -- its release gives the hold back there and nowhere else.
  if held ~= '0' and opt(ARGV[14 + 3 * i]) then
    redis.call('HINCRBY', up .. ':live', kind == 'p' and 'treserved' or 'reserved', held)
    kind = string.upper(kind)
  end
  -- A group keeps a rolling minute only when it has an rpm.
  if string.lower(kind) == 'g' and opt(ARGV[15 + 3 * i]) then
    redis.call('ZADD', up .. ':min', now, f)
    redis.call('PEXPIRE', up .. ':min', MS_MIN)
  end
  levels[#levels + 1] = kind .. up
end
if rpm then
  redis.call('ZADD', minute, now_s, f)
  redis.call('PEXPIRE', minute, MS_MIN_S)
else
  -- Keys without an rpm keep no window, only this minute's count for the usage report.
  local rmin = p .. ':rmin:' .. math.floor(now / MS_MIN)
  redis.call('INCR', rmin)
  redis.call('PEXPIRE', rmin, 2 * MS_MIN)
end
if redis.call('INCR', daykey) == 1 then redis.call('PEXPIRE', daykey, MS_2DAY_S) end
if held ~= '0' then redis.call('HINCRBY', live, 'reserved', held) end
redis.call('HINCRBY', live, 'inflight', '1')
if hheld then
  if hheld ~= '0' then redis.call('HINCRBY', hr, 'r', hheld) end
  redis.call('PEXPIRE', hr, HR_TTL)
end
if lp then
  local sec = math.floor(now / 1000)
  redis.call('HINCRBY', lp, sec, 1)
  redis.call('PEXPIRE', lp, LOOP_TTL)
  touch(lp, sec, now, LOOP_TTL)
end

local exp = now + ARGV[10]
-- The day it was counted in: a lost reply's admission gives its minute and day back.
local rec = held .. '|' .. ARGV[11] .. '|' .. month_s .. '|' .. key_id .. '|'
  .. table.concat(levels, ' ') .. '|d' .. day_s
-- The hour hold, and the mark that settling books the cost to the hour window.
if hheld then rec = rec .. '|h' .. hheld end
redis.call('HSET', RES, f, rec)
redis.call('ZADD', RESX, exp, f)
redis.call('SADD', '{sg}:node:' .. node, f)

local remaining, reset = -1, 0
if rpm then
  remaining = rpm - n - 1
  if remaining <= 0 then
    remaining = 0
    reset = reset_secs(minute, n + 1, rpm, now, 0)
  end
end
-- A group's minute that refuses before the key's own: the rate-limit headers describe it,
-- its rpm the reply's last figure.
if grpm and (not rpm or grpm - gn - 1 < remaining) then
  remaining, reset = grpm - gn - 1, 0
  if remaining <= 0 then
    remaining = 0
    reset = reset_secs(gmin, gn + 1, grpm, now, 0)
  end
  return {1, month, remaining, reset, warning, now, grpm}
end
return {1, month, remaining, reset, warning, now}
