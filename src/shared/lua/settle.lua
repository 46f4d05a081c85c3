-- Settles one reservation: releases its hold and slot and books the charge, if any, to the
-- month it was admitted in, only if that month is in Redis (never creates it: a later seed
-- would then skip the ledger's history).
-- KEYS[1] key prefix (routing only; the reservation record names its key).
-- ARGV node, res_id, has_charge (1/0), model, prompt_tokens, completion_tokens, cost.
-- Returns 1 if the reservation was open, 0 if it was reaped (its estimate already charged).
local held, month, p = unlink(ARGV[1] .. ':' .. ARGV[2])
if not held then return 0 end
if ARGV[3] == '1' then
  local mon = p .. ':mon:' .. month
  if redis.call('EXISTS', mon) == 1 then
    local m = ARGV[4]
    hincr(mon, 'spent', ARGV[7])
    hincr(mon, 'n:' .. m, 1)
    hincr(mon, 'p:' .. m, ARGV[5])
    hincr(mon, 'c:' .. m, ARGV[6])
    hincr(mon, 's:' .. m, ARGV[7])
  end
end
return 1
