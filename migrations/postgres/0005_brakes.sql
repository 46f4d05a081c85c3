-- Runaway-agent brakes (SPEC §7): NULL = no limit.
ALTER TABLE keys ADD COLUMN IF NOT EXISTS max_usd_per_hour_nanos BIGINT;
ALTER TABLE keys ADD COLUMN IF NOT EXISTS loop_limit BIGINT;
