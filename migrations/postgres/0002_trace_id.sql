-- The W3C trace id of each request (32 hex digits, as in `traceparent`), so a request can
-- be found from the agent's own trace. Applied by `store::pg` like 0001.
ALTER TABLE traces ADD COLUMN IF NOT EXISTS trace_id TEXT;
