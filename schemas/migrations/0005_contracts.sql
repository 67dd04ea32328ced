-- Contracts (issue 7): what producers sent (submissions, dead letters), what changed (the change
-- feed), and the stable, versioned read API for consumers (schema talkwire_v1, role
-- talkwire_reader). Append-only: later changes go in new numbered files.

-- Every accepted producer message, keyed for idempotency: a resend with the same
-- (producer, idempotency_key) only bumps `duplicates`, it never stores anything new.
CREATE TABLE submissions (
    id                bigserial PRIMARY KEY,
    producer          text NOT NULL,
    idempotency_key   text NOT NULL,
    kind              text NOT NULL CHECK (kind IN ('ingest_url', 'ingest_document')),
    schema_version    integer NOT NULL,
    via               text NOT NULL,                        -- celery | stream | replay
    source_ref        text,                                  -- Celery task id or stream entry id
    payload_sha256    text NOT NULL,                         -- of the canonical JSON, to spot key reuse
    hints             jsonb NOT NULL DEFAULT '{}',
    article_id        bigint REFERENCES articles (id) ON DELETE SET NULL,
    received_at       timestamptz NOT NULL DEFAULT now(),
    duplicates        integer NOT NULL DEFAULT 0,
    last_duplicate_at timestamptz,
    UNIQUE (producer, idempotency_key)
);

-- store_article (a producer's hints) and the consumer view look submissions up by article.
CREATE INDEX submissions_article_idx ON submissions (article_id);

-- A message that could not be accepted: its raw bytes (whole up to a bound, else the head plus
-- size and sha256), a stable reason code and a human detail. Never retried by itself; an
-- operator replays it with `talkwire dead-letters replay`.
CREATE TABLE dead_letters (
    id                bigserial PRIMARY KEY,
    received_at       timestamptz NOT NULL DEFAULT now(),
    via               text NOT NULL,                        -- celery | stream | replay
    source_ref        text,                                  -- Celery task id or stream entry id
    kind              text,                                  -- ingest_url | ingest_document | NULL
    producer          text,                                  -- as the message claims, when readable
    reason            text NOT NULL,                         -- stable code, e.g. missing_field
    detail            text NOT NULL,
    payload           bytea NOT NULL,
    payload_size      bigint NOT NULL,
    payload_sha256    text NOT NULL,
    payload_truncated boolean NOT NULL,
    replayed_at       timestamptz,
    replay_outcome    text
);

-- A redelivered message (worker killed after the insert, before the ack) is recorded once.
CREATE UNIQUE INDEX dead_letters_source_idx ON dead_letters (via, source_ref)
    WHERE source_ref IS NOT NULL;
CREATE INDEX dead_letters_reason_idx ON dead_letters (reason, received_at);

-- The change feed: one row per change, written in the same transaction as the change.
-- Ids are handed out under a transaction-level advisory lock (trigger below), so ids commit
-- in increasing order: a consumer that has seen id N will never later see a smaller id
-- appear. A bigserial alone allows that (two writers take 5 and 6, 6 commits first), and a
-- consumer resuming "after 6" would miss 5 for ever.
CREATE SEQUENCE changes_id_seq;
CREATE TABLE changes (
    id          bigint PRIMARY KEY,
    event       text NOT NULL CHECK (event IN ('article_created', 'article_updated', 'story_merged',
                                               'round_link_changed', 'round_created',
                                               'round_updated')),
    entity      text NOT NULL,                              -- article | story | round | round_link
    entity_id   bigint NOT NULL,
    payload     jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER SEQUENCE changes_id_seq OWNED BY changes.id;

CREATE FUNCTION changes_assign_id() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Held until this transaction ends: the next writer's id is taken after we commit.
    -- Writers should append their change last in the transaction to keep the wait short.
    PERFORM pg_advisory_xact_lock(7466723);  -- any constant; the same in every writer
    NEW.id := nextval('changes_id_seq');
    RETURN NEW;
END $$;

CREATE TRIGGER changes_assign_id BEFORE INSERT ON changes
    FOR EACH ROW EXECUTE FUNCTION changes_assign_id();

-- NOTIFY is delivered on commit, in commit order, and never for a rolled-back change.
CREATE FUNCTION changes_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('talkwire_changes', NEW.id::text);
    RETURN NULL;
END $$;

CREATE TRIGGER changes_notify AFTER INSERT ON changes
    FOR EACH ROW EXECUTE FUNCTION changes_notify();

-- Append-only: a consumer that read a change must never see it change. Deleting old rows
-- (retention) is allowed.
CREATE FUNCTION changes_refuse_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'changes is append-only';
END $$;

CREATE TRIGGER changes_append_only BEFORE UPDATE ON changes
    FOR EACH ROW EXECUTE FUNCTION changes_refuse_update();

-- The read API, version 1. Views only: the tables behind them may change; these columns keep
-- their names and meaning, and only ever gain new columns (or new views). A breaking change
-- gets a talkwire_v2 beside it. Later features add their views here (stories, labels, facts,
-- round links, rounds) under the same naming.
CREATE SCHEMA talkwire_v1;
COMMENT ON SCHEMA talkwire_v1 IS
    'talkwire read API v1: stable views for consumers; columns are only ever added';

CREATE VIEW talkwire_v1.articles AS
SELECT id, url, canonical_url, final_url, title, description, author, site_name, language,
       published_at, body AS text, origin, discovered_at, stored_at
FROM articles
WHERE state = 'stored';

CREATE VIEW talkwire_v1.feeds AS
SELECT id, url, title, site_url, status, last_polled_at, last_success_at, created_at
FROM feeds;

-- Every place and time a feed carried a stored article.
CREATE VIEW talkwire_v1.sightings AS
SELECT e.feed_id, e.article_id, e.url, e.title, e.published_at, e.first_seen_at, e.last_seen_at
FROM entries e
JOIN articles a ON a.id = e.article_id AND a.state = 'stored';

CREATE VIEW talkwire_v1.changes AS
SELECT id, event, entity, entity_id, payload, created_at
FROM changes;

-- Producers can look up what became of their messages.
CREATE VIEW talkwire_v1.submissions AS
SELECT producer, idempotency_key, kind, schema_version, via, article_id, received_at,
       duplicates, last_duplicate_at
FROM submissions;

CREATE VIEW talkwire_v1.dead_letters AS
SELECT id, producer, kind, via, reason, detail, payload_size, payload_sha256, received_at,
       replayed_at, replay_outcome
FROM dead_letters;

-- The consumers' role: read the views, nothing else. Roles are cluster-wide, so it is created
-- once and reused by every database on the cluster (two migrations may race to create it).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'talkwire_reader') THEN
        CREATE ROLE talkwire_reader NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- another database's migration created it at the same moment
END $$;

GRANT USAGE ON SCHEMA talkwire_v1 TO talkwire_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA talkwire_v1 TO talkwire_reader;
-- Views that later migrations add to talkwire_v1 are readable without another GRANT.
ALTER DEFAULT PRIVILEGES IN SCHEMA talkwire_v1 GRANT SELECT ON TABLES TO talkwire_reader;
