-- Helpers prepended to every SpiderGate script (see src/shared/redis.rs for the data model).
-- One clock for the whole cluster: Redis' own TIME, so nodes with skewed clocks agree on the
-- rolling minute, the UTC day and the calendar month.
local MS_MIN = 60000
local MS_DAY = 86400000
local RES = '{sg}:res'
local RESX = '{sg}:resx'
local ORPHANED = '(orphaned)'
-- A field of RES and a member of RESX that is no reservation (no node id starts with `~`),
-- longer than Redis' default `hash-max-listpack-value` and `zset-max-listpack-value` (64):
-- it keeps both in Redis' hash-table and skip-list encodings. Without it, while fewer than
-- 128 reservations are open (as at 32 connections a node), Redis keeps them as listpacks,
-- where every HSET, HMGET, HDEL, ZADD and ZREM of a reservation walks the entries one by
-- one. A hash table's never goes back to a listpack, and RES never empties with it in.
-- Nothing reads it: RES is read by field and RESX by score, and its score is +inf.
local PAD = '~pad: keeps this hash and sorted set out of the listpack encoding (see common.lua)'
local REAPED = '{sg}:reaped:'
-- The runaway-agent brakes (limits::brakes, same buckets): spend settled in clock minute m
-- counts until an hour after the latest booking in m; an admission in clock second s until
-- 60 s after the latest admission in s. Beside each bucket hash, `<hash>:l` holds per
-- bucket `<latest ms>:<the bucket's value then>`. A bucket whose value is not the one
-- recorded there (an older version's node added to it in a rolling upgrade, and older
-- versions do not record) or that has no record counts until the end of its minute + 60
-- or its second + 60, as it did then: never less than any of its entries needs.
local HOUR_MINUTES = 60
local LOOP_SECONDS = 60
local HR_TTL = 7200000
local LOOP_TTL = 62000

-- A hash's buckets still in its window of `span` ms at `now`, oldest first: {bucket,
-- value, leaves}; buckets that left are deleted (with their record). Buckets are `size` ms
-- long; `skip` names a field that is not a bucket. Also returns the hash's fields.
local function window(hash, size, span, now, skip)
  local lh = hash .. ':l'
  local rec = {}
  local l = redis.call('HGETALL', lh)
  for i = 1, #l, 2 do rec[l[i]] = l[i + 1] end
  local h = redis.call('HGETALL', hash)
  local out = {}
  for i = 1, #h, 2 do
    if h[i] ~= skip then
      local b = tonumber(h[i])
      local at = (b + 1) * size - 1 + span
      local ms, value = string.match(rec[h[i]] or '', '^(%d+):(.*)$')
      if ms and value == h[i + 1] then at = tonumber(ms) + span end
      if at > now then
        out[#out + 1] = {b, tonumber(h[i + 1]), at}
      else
        redis.call('HDEL', hash, h[i])
        redis.call('HDEL', lh, h[i])
      end
    end
  end
  table.sort(out, function(x, y) return x[1] < y[1] end)
  return out, h
end

-- Records bucket `b` of `hash`, just written at `now`: its latest entry (never moved back)
-- and its value as it stands.
local function touch(hash, b, now, ttl)
  local lh = hash .. ':l'
  local prev = tonumber(string.match(redis.call('HGET', lh, b) or '', '^(%d+):') or '-1')
  if prev > now then now = prev end
  redis.call('HSET', lh, b, string.format('%.0f', now) .. ':' .. redis.call('HGET', hash, b))
  redis.call('PEXPIRE', lh, ttl)
end

-- Puts PAD back, should RES or RESX have lost it (a FLUSHALL, a key deleted by hand). Run
-- by the heartbeat and the seed, not on the request path.
local function keep_tables()
  redis.call('HSETNX', RES, PAD, '1')
  redis.call('ZADD', RESX, 'NX', 'inf', PAD)
end

local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end

-- Turning numbers into text and back is much of what a script costs Redis 7.0: Lua writes
-- a number with sprintf('%.14g'), Redis writes a number argument with snprintf('%.17g'),
-- and `tonumber` reads text with strtod twice. So the scripts give Redis text where they
-- can (the constants below, a figure turned into text once and used again), and read text
-- that must be a number with `x + 0` (one strtod; an error, as arithmetic on nil would be,
-- if it is not a number).
local MS_MIN_S, MS_2MIN_S, MS_2DAY_S = '60000', '120000', '172800000'
-- A figure read from Redis: text, or false where the field or key is missing (then 0).
local function n0(x)
  if x then return x + 0 end
  return 0
end

-- clock::civil_from_days reduced to clock::month_index (year * 12 + month - 1). Floor
-- division throughout; Rust's truncating `/` agrees for every day since year 0.
local function month_of_day(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return y * 12 + m - 1
end

-- Limits travel as integers with -1 for "none".
local function opt(s)
  local n = tonumber(s)
  if n < 0 then return nil end
  return n
end

-- HINCRBY that saturates at i64::MAX like `Nanos`, instead of raising an error half-way
-- through a script (Redis does not roll back the writes made before an error).
local function hincr(key, field, by)
  local r = redis.pcall('HINCRBY', key, field, by)
  if type(r) == 'table' and r.err then
    redis.call('HSET', key, field, '9223372036854775807')
  end
end

-- Seconds until the window `zkey` (n admissions after `now - MS_MIN`) frees a slot under
-- `limit`: when its (n - limit + 1)-th oldest entry leaves. At least 1, like Retry-After.
local function reset_secs(zkey, n, limit, now, none)
  local idx = n - limit
  if idx < 0 then idx = 0 end
  local e = redis.call('ZRANGEBYSCORE', zkey, '(' .. (now - MS_MIN), '+inf', 'WITHSCORES',
    'LIMIT', idx, 1)
  if #e == 0 then return none end
  return math.max(1, math.ceil((tonumber(e[2]) + MS_MIN - now) / 1000))
end

-- Remaining model requests in the rolling minute and seconds until one frees (`Standing`).
local function standing(p, rpm, now)
  if not rpm then return -1, 0 end
  local minute = p .. ':min'
  local n = redis.call('ZCOUNT', minute, '(' .. (now - MS_MIN), '+inf')
  if n < rpm then return rpm - n, 0 end
  return 0, reset_secs(minute, n, rpm, now, 0)
end

-- Books `cost` of key prefix `p` to the hour window's current minute (keys with
-- max_usd_per_hour only).
local function book_hour(p, cost)
  if cost == '0' or cost == 0 then return end
  local hr = p .. ':hr'
  local now = now_ms()
  local m = tostring(math.floor(now / MS_MIN))
  hincr(hr, m, cost)
  redis.call('PEXPIRE', hr, HR_TTL)
  touch(hr, m, now, HR_TTL)
end

-- A reservation record: held, estimate, month, key id, the levels above the key it counts
-- against (SPEC §7; "p<prefix> G<prefix>": a parent, a group; in capitals where the hold was
-- taken, at a hard cap; empty for a lone key), then tagged fields: the
-- hour hold (`h<n>`, keys with max_usd_per_hour only) and the day it was counted in (`d<n>`):
-- `held|estimate|month|key_id|levels|d<day>[|h<hour hold>]`. Older records
-- (`held|estimate|month|key_id[|levels][|h<n>]`) read too: a levels field never starts with
-- `h` or `d`.
local function parse_rec(rec)
  local held, est, month, key_id, rest = string.match(rec, '^(%d+)|(%d+)|(%-?%d+)|([^|]*)(.*)$')
  local levels, hheld, day = '', nil, nil
  for field in string.gmatch(rest or '', '|([^|]*)') do
    local tag, n = string.match(field, '^([hd])(%d+)$')
    if tag == 'h' then
      hheld = n
    elseif tag == 'd' then
      day = n
    elseif field ~= '' then
      levels = field
    end
  end
  return held, est, month, key_id, hheld, levels, day
end

-- An admission whose reply was lost (the request was refused, not forwarded): gives back the
-- minute and the day it counted, at the key and at its group, before `unlink` releases its
-- hold and slot. SPEC §2: a refused request consumes no quota.
local function unadmit(f)
  local rec = redis.call('HGET', RES, f)
  if not rec then return end
  local _, _, _, key_id, _, lv, day = parse_rec(rec)
  local p = '{sg}:k:' .. key_id
  redis.call('ZREM', p .. ':min', f)
  if day then
    local daykey = p .. ':day:' .. day
    if tonumber(redis.call('GET', daykey) or '0') > 0 then redis.call('DECR', daykey) end
  end
  for l in string.gmatch(lv or '', '%S+') do
    if string.lower(string.sub(l, 1, 1)) == 'g' then
      redis.call('ZREM', string.sub(l, 2) .. ':min', f)
    end
  end
end

-- The levels of a record as {kind, prefix} pairs.
local function levels_of(s)
  local out = {}
  for lv in string.gmatch(s or '', '%S+') do
    out[#out + 1] = {string.sub(lv, 1, 1), string.sub(lv, 2)}
  end
  return out
end

-- Books `cost` at every level above a key: a parent's tree spend, a group's spend. Only the
-- sums the admission compares (a group's per-model figures come from the ledger, which
-- `GET /admin/groups` reads in a cluster). Only into months that were seeded.
local function book_levels(levels, month, cost)
  for _, lv in ipairs(levels) do
    local umon = lv[2] .. ':mon:' .. month
    if redis.call('EXISTS', umon) == 1 then
      hincr(umon, string.lower(lv[1]) == 'p' and 'tree' or 'spent', cost)
    end
  end
end

-- Removes reservation `f` ("<node>:<res_id>") from every index and gives back its hold (at
-- the key and every level above it), its hour hold and in-flight slot. Returns held, month,
-- the key prefix, the estimate, the hour hold (nil for a key without max_usd_per_hour) and
-- the levels, or nil if it was already gone.
local function unlink(f)
  local rec = redis.call('HGET', RES, f)
  redis.call('HDEL', RES, f)
  redis.call('ZREM', RESX, f)
  local node = string.match(f, '^(%d+):')
  if node then redis.call('SREM', '{sg}:node:' .. node, f) end
  if not rec then return nil end
  local held, est, month, key_id, hheld, lv = parse_rec(rec)
  local p = '{sg}:k:' .. key_id
  local levels = levels_of(lv)
  if held ~= '0' then
    -- Only at the levels that held it (written in capitals: those with a hard cap).
    for _, l in ipairs(levels) do
      if l[1] == 'P' or l[1] == 'G' then
        redis.call('HINCRBY', l[2] .. ':live', l[1] == 'P' and 'treserved' or 'reserved', '-' .. held)
      end
    end
  end
  if hheld then
    local hr = p .. ':hr'
    -- Clamped: a hash that expired under a very long request must not go negative.
    if redis.call('HINCRBY', hr, 'r', '-' .. hheld) < 0 then redis.call('HSET', hr, 'r', 0) end
  end
  -- The per-key expiry set of older versions (still filled by an older node in a rolling
  -- upgrade, whose admissions sweep it): cleared, so it never holds settled reservations.
  redis.call('ZREM', p .. ':rx', f)
  local live = p .. ':live'
  -- No request of the key is open any more, so nothing of its own is held either: its
  -- own fields go (this also heals any drift instead of carrying it forever), and the
  -- hash with them unless it also carries its tree's holds (`treserved`, a parent's).
  -- Else its hold is given back.
  if redis.call('HINCRBY', live, 'inflight', '-1') <= 0 then
    redis.call('HDEL', live, 'reserved', 'inflight')
  elseif held ~= '0' then
    redis.call('HINCRBY', live, 'reserved', '-' .. held)
  end
  return held, month, p, est, hheld, levels
end

-- An expired reservation (its node stopped heart-beating): released and charged at its
-- estimate, an upper bound of what the upstream may have done, to the month it was admitted
-- in, under the model ORPHANED. Never creates a month that was not seeded.
local function reap_one(f)
  local held, month, p, est, hheld, levels = unlink(f)
  -- Its estimate is what the hour window books for it too.
  if hheld and est then book_hour(p, est) end
  -- Tells a late settlement of this hold that its estimate was charged (see settle.lua);
  -- kept a day, far longer than any request.
  if held then redis.call('SET', REAPED .. f, 1, 'PX', MS_DAY) end
  -- Every key's orphans are charged (the ledger's journal charges them too), not only the
  -- hard-budget ones that held their estimate.
  if est and est ~= '0' then
    local mon = p .. ':mon:' .. month
    if redis.call('EXISTS', mon) == 1 then
      hincr(mon, 'spent', est)
      hincr(mon, 'n:' .. ORPHANED, 1)
      hincr(mon, 's:' .. ORPHANED, est)
    end
    book_levels(levels or {}, month, est)
  end
end

