-- Runs a batch of admissions and settlements of one node (many requests, one round trip),
-- in order, each deciding exactly as admit.lua or settle.lua alone would, on one clock
-- reading. Redis runs one script at a time, so a batch is as atomic as each of its operations.
-- KEYS[1] `{sg}:res` (routes the call; every key is in the `{sg}` slot).
-- ARGV node, ttl_ms, then per operation one of:
--   'A' key_id res_id rpm rpd cap hard max_inflight held estimate: an admission of a key with
--       no level above it and no brakes (admit.lua's arguments, with this node and ttl);
--   'a' key count, argument count, keys, arguments: any admission, as admit.lua takes it;
--   'S' key_prefix res_id has_charge model prompt_tokens completion_tokens cost month: a
--       settlement of this node's reservation (settle.lua's key and arguments, with this
--       node).
-- Returns one reply per operation, in order, as admit.lua and settle.lua return them, as
-- one string (see `enc`): `1,24311,5,0,0,1765000000000;1;...`.
--
-- The common operations (a key with no level above it and no brakes; a settlement of such
-- a key's reservation) share their reads and writes: each key's figures are read once per
-- batch and kept here, and every write is summed and sent once at the end (one HINCRBY for
-- many holds, one ZADD for many window entries, one HSET for many records). Each decision
-- still sees every operation before it, so the outcome is the one-by-one outcome. Any other
-- operation first writes out everything pending and forgets what was read, then runs
-- admit.lua or settle.lua as is.
--
-- Everything below is defined once and `batch` runs it for one call: loaded as a Redis
-- function library (FUNCTION LOAD, where Redis has functions), these definitions stay
-- between calls, so a call no longer creates every function as a closure anew (an empty
-- batch cost 14.6 µs of Redis CPU as a script, most of it that). So the per-batch values
-- below are the library's locals, each set by `batch` at the start of a call; nothing read
-- in one call survives into the next (only the memos of `num_of`, `txt` and `opt1`, which
-- hold conversions, not data).

-- The call's operations (ARGV, or the function's arguments).
local args
-- Redis' clock for the whole batch, its UTC day and calendar month (and the two as text).
local now, day, month, day_s, month_s
local function clock() return now end

-- Integers for HINCRBY/INCRBY: Lua would write 1e+15 for a large double.
local function int(n) return string.format('%.0f', n) end

-- Beyond what common.lua does against number conversions (`n0`, text arguments), the
-- library remembers the figures that recur from call to call (limits, holds, token counts,
-- costs, small counts, the month), each converted once: pure conversions, at most MEMO of
-- each kind, then the memo starts over. (A script could not: it starts anew at every call.)
local MEMO = 4096
-- `convert`, remembered: its answer for each argument seen (nil kept as false).
local function memo(convert)
  local seen, n = {}, 0
  return function(x)
    local v = seen[x]
    if v == nil then
      v = convert(x) or false
      if n >= MEMO then seen, n = {}, 0 end
      seen[x] = v
      n = n + 1
    end
    return v or nil
  end
end
-- `tonumber(s)` of a recurring text; `int(n)` of a recurring integer. (`tonumber` is
-- reached at the call: a library's top level may not read Lua's globals while it loads.)
local num_of = memo(function(s) return tonumber(s) end)
local txt = memo(int)
-- The parts of a fast admission's record around its key id (see parse_rec).
local rec_tail, rec_day
-- Per batch, not per operation: the clock and the expiry of this node's holds (every fast
-- admission's), as the strings Redis gets.
local now_s, exp_s
-- An admitted fast admission's reply as text (see `enc`): what every one of the batch shares,
-- turned into text once.
local admitted_head, admitted_tail
-- A limit's number (`opt`), parsed once per distinct text.
local opt1 = memo(opt)

-- Per key prefix: what was read (once `loaded`) and what is pending.
local S
-- Pending writes of records and indexes, for every key.
local resadd, resdel, xadd, xdel, nadd, ndel
-- Reservations settled in this batch, not yet removed from Redis.
local gone
-- The records of the reservations this batch settles, read in one HMGET before the first
-- operation (false: none). Forgotten whenever something else may have changed a record: a
-- reap, or an operation run as is.
local pre
local dirty
-- This batch has swept the expired reservations, and fewer than the 64 a sweep takes were
-- due: every one left due is one this batch settled (`gone`). Its clock stands still and
-- what it admits expires after it, so no other comes due before the batch ends: the next
-- key it reads need not sweep again (a fleet's batch reads many keys).
local swept

local function state(p)
  local s = S[p]
  if not s then
    s = {p = p, min = p .. ':min', day = p .. ':day:' .. day_s, madd = {}, rmin = 0, dadd = 0,
      dres = 0, dinf = 0, rxdel = {}, books = {}}
    S[p] = s
  end
  return s
end

local function flush_minute(s)
  if #s.madd > 0 then
    redis.call('ZADD', s.min, unpack(s.madd))
    redis.call('PEXPIRE', s.min, MS_MIN_S)
    s.madd = {}
  end
end

local function flush_key(s)
  local p = s.p
  flush_minute(s)
  if s.rmin > 0 then
    local rmin = p .. ':rmin:' .. txt(math.floor(now / MS_MIN))
    redis.call('INCRBY', rmin, txt(s.rmin))
    redis.call('PEXPIRE', rmin, MS_2MIN_S)
    s.rmin = 0
  end
  if s.dadd > 0 then
    local n = redis.call('INCRBY', s.day, txt(s.dadd))
    if n == s.dadd then redis.call('PEXPIRE', s.day, MS_2DAY_S) end
    s.dn = n
    s.dadd = 0
  end
  -- As unlink does: the per-key expiry set of older versions (see common.lua).
  if #s.rxdel > 0 then
    redis.call('ZREM', p .. ':rx', unpack(s.rxdel))
    s.rxdel = {}
  end
  local live = p .. ':live'
  local idle = false
  if s.dinf ~= 0 then
    local n = redis.call('HINCRBY', live, 'inflight', txt(s.dinf))
    -- As unlink does: no request of the key open, so nothing of its own held either (its
    -- holds need no decrement: they go).
    if s.dinf < 0 and n <= 0 then
      redis.call('HDEL', live, 'reserved', 'inflight')
      n = 0
      idle = true
      if s.loaded then s.res = s.tres end
    end
    if s.loaded then s.inf = n end
    s.dinf = 0
  end
  if s.dres ~= 0 and not idle then
    redis.call('HINCRBY', live, 'reserved', txt(s.dres))
    if s.loaded then s.res = s.res + s.dres end
  end
  s.dres = 0
  -- Keyed by the month as the record writes it (see settle_fast).
  for mo, b in pairs(s.books) do
    local mon = p .. ':mon:' .. mo
    -- Never creates a month (see settle.lua).
    if redis.call('EXISTS', mon) == 1 then
      hincr(mon, 'spent', txt(b.spent))
      for m, c in pairs(b.models) do
        hincr(mon, 'n:' .. m, txt(c[1]))
        hincr(mon, 'p:' .. m, txt(c[2]))
        hincr(mon, 'c:' .. m, txt(c[3]))
        hincr(mon, 's:' .. m, txt(c[4]))
      end
      if s.loaded and mo == month_s then s.own = s.own + b.spent end
    end
  end
  s.books = {}
end

local function flush_all()
  if not dirty then return end
  for _, s in pairs(S) do flush_key(s) end
  if #resadd > 0 then redis.call('HSET', RES, unpack(resadd)) end
  if #resdel > 0 then redis.call('HDEL', RES, unpack(resdel)) end
  if #xadd > 0 then redis.call('ZADD', RESX, unpack(xadd)) end
  if #xdel > 0 then redis.call('ZREM', RESX, unpack(xdel)) end
  for node, fs in pairs(nadd) do redis.call('SADD', '{sg}:node:' .. node, unpack(fs)) end
  for node, fs in pairs(ndel) do redis.call('SREM', '{sg}:node:' .. node, unpack(fs)) end
  resadd, resdel, xadd, xdel, nadd, ndel = {}, {}, {}, {}, {}, {}
  gone = {}
  dirty = false
end

-- Writes everything out and forgets every key's figures (before an operation run as is).
local function settle_all()
  flush_all()
  S = {}
  pre = {}
end

-- A key's figures, read once per batch, after the expired reservations (the first 64 due,
-- of any key) were reaped (as admit.lua does first). What is pending in this batch is not written first: the figures
-- read here are taken with the key's pending sums added (`dres`, `dinf`, `dadd`, `madd`,
-- `books`), and a reservation this batch settled is not reaped (it is gone). Only when
-- something is reaped is everything written out first and every key's figures forgotten
-- (a reaped hold books at the levels above its key, which may be keys read here).
local function load(p)
  local s = S[p]
  if s and s.loaded then return s end
  local reaped = false
  if not swept then
    local due = redis.call('ZRANGEBYSCORE', RESX, '-inf', now_s, 'LIMIT', '0', '64')
    for _, f in ipairs(due) do
      if not gone[f] then
        if not reaped then
          flush_all()
          reaped = true
        end
        reap_one(f)
      end
    end
    swept = #due < 64
  end
  if reaped then
    S = {}
    pre = {}
  end
  s = state(p)
  local m = redis.call('HMGET', p .. ':mon:' .. month_s, 'seeded', 'spent', 'tree')
  local l = redis.call('HMGET', p .. ':live', 'reserved', 'treserved', 'inflight')
  s.seeded = m[1] and true or false
  s.own, s.tree = n0(m[2]), n0(m[3])
  s.tres = n0(l[2])
  s.res = n0(l[1]) + s.tres
  s.inf = n0(l[3])
  s.loaded = true
  return s
end

-- This month's spend of a loaded key, bookings pending in this batch included.
local function own_spent(s)
  local b = s.books[month_s]
  return s.own + (b and b.spent or 0)
end

-- admit.lua for a key with no level above it and no brakes (its key prefix and arguments).
local function admit_fast(p, key_id, node, res_id, rpm, rpd, cap, hard, max_inflight, held,
    ttl, estimate)
  rpm, rpd, cap = opt1(rpm), opt1(rpd), opt1(cap)
  hard = hard == '1'
  max_inflight = opt1(max_inflight)
  local heldn = num_of(held)
  local s = load(p)
  if not s.seeded then return {0, month, day, 0} end

  local warning = 0
  if cap then
    if hard then
      local spent = own_spent(s) + s.tree
      local reserved = s.res + s.dres
      if spent + reserved + heldn > cap then return {2, spent, reserved} end
    elseif own_spent(s) >= cap then
      warning = 1
    end
  end

  local minute = s.min
  local n = 0
  if rpm then
    if not s.n then
      redis.call('ZREMRANGEBYSCORE', minute, '-inf', now - MS_MIN)
      s.n = redis.call('ZCARD', minute) + #s.madd / 2
    end
    n = s.n
    if n >= rpm then
      flush_minute(s)
      return {3, reset_secs(minute, n, rpm, now, 1)}
    end
  end
  if rpd then
    if not s.dn then s.dn = n0(redis.call('GET', s.day)) end
    if s.dn + s.dadd >= rpd then
      return {4, math.max(1, math.ceil(((day + 1) * MS_DAY - now) / 1000))}
    end
  end
  if max_inflight and s.inf + s.dinf >= max_inflight then return {5} end

  -- Every check passed: the minute, the day, the hold and the slot, pending.
  local f = node .. ':' .. res_id
  if rpm then
    local madd = s.madd
    madd[#madd + 1] = now_s
    madd[#madd + 1] = f
    s.n = n + 1
  else
    s.rmin = s.rmin + 1
  end
  s.dadd = s.dadd + 1
  if held ~= '0' then s.dres = s.dres + heldn end
  s.dinf = s.dinf + 1
  local exp = exp_s
  resadd[#resadd + 1] = f
  resadd[#resadd + 1] = held .. '|' .. estimate .. rec_tail .. key_id .. rec_day
  xadd[#xadd + 1] = exp
  xadd[#xadd + 1] = f
  local na = nadd[node]
  if not na then na = {} nadd[node] = na end
  na[#na + 1] = f
  dirty = true

  local remaining, reset = -1, 0
  if rpm then
    remaining = rpm - n - 1
    if remaining <= 0 then
      remaining = 0
      flush_minute(s)
      reset = reset_secs(minute, n + 1, rpm, now, 0)
    end
  end
  -- {1, month, remaining, reset, warning, now}, as `enc` would write it: only `remaining`
  -- (and a rare `reset`) turned into text here, the rest shared by the batch.
  return admitted_head .. txt(remaining) .. (reset == 0 and ',0' or ',' .. txt(reset))
    .. (warning == 1 and ',1' or ',0') .. admitted_tail
end

-- Exact as a double: at most 15 digits (admit.lua and settle.lua compare the same way;
-- longer figures take the one-by-one path, which adds them as strings).
local function small(x) return #x <= 15 end

-- settle.lua for an open reservation with no level and no hour hold (a record as
-- admit_fast writes it: `held|estimate|month|key_id||d<day>`); nil for any other (run as is by
-- the caller).
local function settle_fast(node, res_id, charge, model, prompt, completion, cost)
  local f = node .. ':' .. res_id
  local rec = pre[f]
  if rec == nil then rec = redis.call('HGET', RES, f) end
  if not rec then return nil end
  local held, mo, key_id = string.match(rec, '^(%d+)|%d+|(%-?%d+)|([^|]*)||d%d+$')
  charge = charge == '1'
  if not held or not small(held)
    or (charge and not (small(prompt) and small(completion) and small(cost))) then
    return nil
  end
  -- `mo` stays text: the books are keyed by it as the month's hash is named (the record
  -- writes the month as Lua writes an integer, as `month_s` is).
  local s = state('{sg}:k:' .. key_id)
  resdel[#resdel + 1] = f
  gone[f] = true
  xdel[#xdel + 1] = f
  s.rxdel[#s.rxdel + 1] = f
  local nd = ndel[node]
  if not nd then nd = {} ndel[node] = nd end
  nd[#nd + 1] = f
  if held ~= '0' then s.dres = s.dres - num_of(held) end
  s.dinf = s.dinf - 1
  if charge then
    local b = s.books[mo]
    if not b then b = {spent = 0, models = {}} s.books[mo] = b end
    cost = num_of(cost)
    b.spent = b.spent + cost
    local c = b.models[model]
    if not c then c = {0, 0, 0, 0} b.models[model] = c end
    c[1] = c[1] + 1
    c[2] = c[2] + num_of(prompt)
    c[3] = c[3] + num_of(completion)
    c[4] = c[4] + cost
  end
  dirty = true
  return '1'
end

-- One operation's reply as text, its integers separated by ',' (`1,24311,5,0,0,1765...`);
-- the batch returns them separated by ';'. One string instead of an array of arrays: the
-- node's client parses a string in one go, an array integer by integer at about a thousand
-- instructions each. Plain `tostring` below 1e14 (exact: `%.14g`), `%.0f` above, so no
-- figure is ever written with an exponent.
local function num(x)
  if type(x) == 'number' and (x >= 1e14 or x <= -1e14) then return int(x) end
  return x
end
local function enc(r)
  -- A string is a reply already written as text (admit_fast, settle_fast).
  if type(r) ~= 'table' then return num(r) end
  local t = {}
  for k = 1, #r do t[k] = num(r[k]) end
  return table.concat(t, ',')
end

-- Copies of one operation's keys and arguments, for admit.lua and settle.lua.
local function slice(from, count)
  local t = {}
  for j = 1, count do t[j] = args[from + j - 1] end
  return t
end

-- One call: `argv` as described at the top.
local function batch(argv)
  args = argv
  local ARGV = argv
  local t = redis.call('TIME')
  now = t[1] * 1000 + math.floor(t[2] / 1000)
  day = math.floor(now / MS_DAY)
  month = month_of_day(day)
  day_s, month_s = txt(day), txt(month)
  rec_tail = '|' .. month_s .. '|'
  rec_day = '||d' .. day_s
  now_s = int(now)
  exp_s = int(now + num_of(ARGV[2]))
  admitted_head = '1,' .. month_s .. ','
  admitted_tail = ',' .. now_s
  S, gone, pre, dirty, swept = {}, {}, {}, false, false
  resadd, resdel, xadd, xdel, nadd, ndel = {}, {}, {}, {}, {}, {}

  local node, ttl = ARGV[1], ARGV[2]
  local out, i, n = {}, 3, #ARGV
  -- The settlements' records, in one read.
  do
    local fs, j = {}, 3
    while j <= n do
      local kind = ARGV[j]
      if kind == 'A' then
        j = j + 10
      elseif kind == 'S' then
        fs[#fs + 1] = node .. ':' .. ARGV[j + 2]
        j = j + 9
      else
        j = j + 3 + tonumber(ARGV[j + 1]) + tonumber(ARGV[j + 2])
      end
    end
    if #fs > 0 then
      local recs = redis.call('HMGET', RES, unpack(fs))
      for k = 1, #fs do pre[fs[k]] = recs[k] or false end
    end
  end
  while i <= n do
    local kind = ARGV[i]
    local r
    if kind == 'A' then
      local key_id, held = ARGV[i + 1], ARGV[i + 8]
      local p = '{sg}:k:' .. key_id
      if small(held) then
        r = admit_fast(p, key_id, node, ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5],
          ARGV[i + 6], ARGV[i + 7], held, ttl, ARGV[i + 9])
      else
        settle_all()
        r = admit_one({p}, {key_id, node, ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5],
          ARGV[i + 6], ARGV[i + 7], held, ttl, ARGV[i + 9]}, clock)
      end
      i = i + 10
    elseif kind == 'S' then
      r = settle_fast(node, ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6],
        ARGV[i + 7])
      if r == nil then
        settle_all()
        r = settle_one({ARGV[i + 1]}, {node, ARGV[i + 2], ARGV[i + 3], ARGV[i + 4],
          ARGV[i + 5], ARGV[i + 6], ARGV[i + 7], ARGV[i + 8]})
      end
      i = i + 9
    else
      local nk, na = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
      settle_all()
      r = admit_one(slice(i + 3, nk), slice(i + 3 + nk, na), clock)
      i = i + 3 + nk + na
    end
    out[#out + 1] = enc(r)
  end
  flush_all()
  -- Nothing of this call is kept until the next (the library's locals outlive the call).
  args, S, gone, pre = nil, nil, nil, nil
  resadd, resdel, xadd, xdel, nadd, ndel = nil, nil, nil, nil, nil, nil
  return table.concat(out, ';')
end
