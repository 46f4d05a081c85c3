-- Fleets (SPEC §7): groups of keys, a key's group, and the key that minted it.
ALTER TABLE keys ADD COLUMN group_name TEXT;
ALTER TABLE keys ADD COLUMN parent_id TEXT;
CREATE INDEX keys_parent ON keys (parent_id) WHERE parent_id IS NOT NULL;

CREATE TABLE groups (
    name         TEXT PRIMARY KEY,
    budget_nanos BIGINT,
    budget_mode  TEXT NOT NULL,
    rpm          BIGINT,
    created_at   BIGINT NOT NULL
);

-- A change to a group logs '*group:<name>' in key_changes: running gateways rebuild their
-- snapshot (group changes are rare). Same lock and version bump as a key change.
CREATE FUNCTION spidergate_group_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1397189475);
    UPDATE meta SET v = v + 1 WHERE k = 'keys_version';
    IF TG_OP = 'DELETE' THEN
        INSERT INTO key_changes (key_id) VALUES ('*group:' || OLD.name);
    ELSE
        INSERT INTO key_changes (key_id) VALUES ('*group:' || NEW.name);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER groups_changed AFTER INSERT OR UPDATE OR DELETE ON groups
    FOR EACH ROW EXECUTE FUNCTION spidergate_group_changed();
