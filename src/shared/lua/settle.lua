-- Settles one reservation: releases its hold and slot and books the charge, if any, to the
-- month it was admitted in, only if that month is in Redis (never creates it: a later seed
-- would then skip the ledger's history).
-- KEYS[1] key prefix.
-- ARGV node, res_id, has_charge (1/0), model, prompt_tokens, completion_tokens, cost, month
-- (the admission's, from admit.lua).
-- Returns 1 if the reservation was open; 0 if it was reaped (its estimate, an upper bound,
-- already charged); 2 if Redis lost it (a restart without persistence): the charge is booked
-- all the same, since the month was re-seeded from a ledger this request is not in yet (its
-- entry is recorded after this settlement).
local f = ARGV[1] .. ':' .. ARGV[2]
local held, month, p, _, hheld, levels = unlink(f)
-- A key with max_usd_per_hour books the real cost to the hour window when it is known.
if hheld and ARGV[3] == '1' then book_hour(p, ARGV[7]) end
local outcome = 1
if not held then
  if redis.call('DEL', REAPED .. f) == 1 then return 0 end
  month, p, outcome = ARGV[8], KEYS[1], 2
end
if ARGV[3] == '1' then
  local mon = p .. ':mon:' .. month
  if redis.call('EXISTS', mon) == 1 then
    local m = ARGV[4]
    hincr(mon, 'spent', ARGV[7])
    hincr(mon, 'n:' .. m, '1')
    hincr(mon, 'p:' .. m, ARGV[5])
    hincr(mon, 'c:' .. m, ARGV[6])
    hincr(mon, 's:' .. m, ARGV[7])
  end
  book_levels(levels or {}, month, ARGV[7])
end
return outcome
