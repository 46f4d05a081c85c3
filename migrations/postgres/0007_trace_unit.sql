-- The unit a trace's cost was charged in (token, image, char, ms) and how many (SPEC §4).
ALTER TABLE traces ADD COLUMN unit TEXT;
ALTER TABLE traces ADD COLUMN units BIGINT;
