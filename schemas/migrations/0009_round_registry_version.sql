-- A version for the round registry, so a worker can keep the rounds in memory and ask only
-- whether they changed (issue 9). Every article's link step reads the registry; reading
-- all of it each time cost a sort and a ~50-row answer per article.
--
-- The version comes from a sequence, not a counter: a transaction that changes rounds and
-- then rolls back has used its number for good, so no later committed change can carry the
-- same version with other contents. The token tells one database's registry from another's
-- (a copy made from a dump or a template shares it: workers key their copy by the database's
-- address and name too).
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

-- BEFORE the statement: a writer takes the registry's row before any row of rounds, so two
-- writers of rounds queue on it instead of each holding a round the other waits for.
CREATE TRIGGER rounds_bump_registry BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON rounds
    FOR EACH STATEMENT EXECUTE FUNCTION round_registry_bump();
