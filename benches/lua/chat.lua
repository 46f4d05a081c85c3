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

-- One machine-readable line for benches/wrk_compare.sh.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT requests=%d duration_us=%d non2xx=%d connect=%d read=%d write=%d timeout=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
