-- wrk script: POST a small chat completion with the bench key.
-- Env: SG_SECRET (bearer secret), SG_STREAM=1 for "stream":true,
-- SG_API=messages for a streamed Anthropic Messages request (key in x-api-key).
local secret = os.getenv("SG_SECRET") or ""
local stream = os.getenv("SG_STREAM") == "1"
local messages = os.getenv("SG_API") == "messages"
-- SG_MODEL: the chat model (the https row names the gateway's model on its TLS provider).
local model = os.getenv("SG_MODEL") or "gpt-4o-mini"

wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. secret
if messages then
  wrk.path = "/v1/messages"
  wrk.headers["Authorization"] = nil
  wrk.headers["x-api-key"] = secret
  wrk.headers["anthropic-version"] = "2023-06-01"
  wrk.body = '{"model":"claude-bench","max_tokens":256,"messages":[{"role":"user","content":"hi"}],"stream":true}'
elseif stream then
  wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user","content":"hi"}],"stream":true}'
else
  wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user","content":"hi"}]}'
end

-- SG_SECRETS: several secrets, space-separated (a fleet of agents, one key each): the
-- requests take them in turn. Each key's request is formatted once here, so a request
-- costs wrk no more than with one key.
local secrets = {}
for s in string.gmatch(os.getenv("SG_SECRETS") or "", "%S+") do secrets[#secrets + 1] = s end
if #secrets > 0 then
  local formatted = {}
  for i, s in ipairs(secrets) do
    if messages then wrk.headers["x-api-key"] = s else wrk.headers["Authorization"] = "Bearer " .. s end
    formatted[i] = wrk.format()
  end
  local last = 0
  function request()
    last = last % #formatted + 1
    return formatted[last]
  end
end

-- One machine-readable line for benches/wrk_compare.sh.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT requests=%d duration_us=%d non2xx=%d connect=%d read=%d write=%d timeout=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
