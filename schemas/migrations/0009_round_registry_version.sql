-- A version for the round registry, so a worker can keep the rounds in memory and ask only
-- whether they changed (issue 9). Every article's link step reads the registry; reading
-- all of it each time cost a sort and a ~50-row answer per article.
--
-- The version comes from a sequence, not a counter: a transaction that changes rounds and
-- then rolls back has used its number for good, so no later committed change can carry the
-- same version with other contents. The token tells one database's registry from another's.
CREATE SEQUENCE round_registry_version_seq;
CREATE TABLE round_registry (
    only_row    boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    token       uuid NOT NULL DEFAULT gen_random_uuid(),
    version     bigint NOT NULL DEFAULT nextval('round_registry_version_seq')
);
INSERT INTO round_registry DEFAULT VALUES;

CREATE FUNCTION round_registry_bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE round_registry SET version = nextval('round_registry_version_seq');
    RETURN NULL;
END $$;

CREATE TRIGGER rounds_bump_registry AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON rounds
    FOR EACH STATEMENT EXECUTE FUNCTION round_registry_bump();
