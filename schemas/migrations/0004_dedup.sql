-- Dedup, versions and wire lineage (issue 6): one canonical URL per article with every URL
-- variant kept as an alias, exact and near-duplicate signatures, stories that group the
-- outlets carrying one dispatch, versions of an article, and a record of every decision.

-- An article row whose URL turned out to name an article we already have becomes a
-- 'duplicate': it stays as a tombstone so that its URL is not fetched again.
ALTER TABLE articles DROP CONSTRAINT articles_state_check;
ALTER TABLE articles ADD CONSTRAINT articles_state_check
    CHECK (state IN ('pending', 'stored', 'failed', 'duplicate'));

ALTER TABLE articles
    ADD COLUMN declared_url  text,        -- rel=canonical / og:url as the page states it
    ADD COLUMN outlet        text,        -- site name, else host without www.
    ADD COLUMN fingerprint   text,        -- hash of the normalized words (exact copies)
    ADD COLUMN shingle_count integer,     -- size of the text in 5-word shingles
    ADD COLUMN version       integer NOT NULL DEFAULT 0,   -- 1 when first stored
    ADD COLUMN story_id      bigint,
    ADD COLUMN duplicate_of  bigint REFERENCES articles (id),
    ADD COLUMN update_of     bigint REFERENCES articles (id),  -- this URL updates that one
    ADD COLUMN latest_id     bigint REFERENCES articles (id);  -- newest in its update chain

-- Until now canonical_url held what the page declared; from here on it is talkwire's
-- canonical URL, unique across articles. Rows stored before keep their declared URL.
UPDATE articles SET declared_url = canonical_url, canonical_url = NULL;
CREATE UNIQUE INDEX articles_canonical_url_key ON articles (canonical_url);
CREATE INDEX articles_fingerprint_idx ON articles (fingerprint) WHERE state = 'stored';
CREATE INDEX articles_story_idx ON articles (story_id);
-- Re-pointing a chain when a newer update arrives looks rows up by their latest.
CREATE INDEX articles_latest_idx ON articles (latest_id) WHERE latest_id IS NOT NULL;

-- Every URL seen for an article, as seen and in canonical form; the first owner keeps it.
CREATE TABLE article_aliases (
    url           text PRIMARY KEY,
    article_id    bigint NOT NULL REFERENCES articles (id),
    kind          text NOT NULL,           -- canonical | discovered | unwrapped | normalized | final | declared
    first_seen_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX article_aliases_article_idx ON article_aliases (article_id);

-- A story: the articles that carry one dispatch, across outlets and updates.
CREATE TABLE stories (
    id                bigserial PRIMARY KEY,
    representative_id bigint NOT NULL REFERENCES articles (id),
    member_count      integer NOT NULL DEFAULT 1,
    merged_into       bigint REFERENCES stories (id),   -- set when merged into another
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE articles ADD CONSTRAINT articles_story_fk FOREIGN KEY (story_id) REFERENCES stories (id);

-- Each version of an article's text. articles.body is always the latest one.
CREATE TABLE article_versions (
    article_id        bigint NOT NULL REFERENCES articles (id),
    version           integer NOT NULL,
    title             text,
    body              text NOT NULL,
    content_hash      text NOT NULL,
    fingerprint       text NOT NULL,
    final_url         text,
    fetched_by        bigint REFERENCES articles (id),  -- the row whose fetch produced it
    diff_summary      text,                 -- vs the version before, e.g. '+2 paragraphs (…)'
    diff              jsonb,
    material          boolean NOT NULL,     -- more than a typo fix
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (article_id, version)
);

-- The MinHash signature of each stored article's latest text, as LSH band keys.
CREATE TABLE article_signatures (
    article_id    bigint PRIMARY KEY REFERENCES articles (id),
    version       integer NOT NULL,
    shingle_count integer NOT NULL,
    band_keys     bigint[] NOT NULL,
    method        text NOT NULL,
    signed_at     timestamptz NOT NULL DEFAULT now()
);

-- One row per (band key, article). A near-duplicate lookup is one index probe per band of
-- the new text, so its cost grows with log(n), not n. No foreign key: rows are written and
-- removed with article_signatures in the same transaction, and a check per row would
-- double the write cost.
CREATE TABLE article_bands (
    band_key   bigint NOT NULL,
    article_id bigint NOT NULL,
    PRIMARY KEY (band_key, article_id)
);

-- Why an article was filed where it is: one row per decision, with its evidence.
CREATE TABLE dedup_decisions (
    id                 bigserial PRIMARY KEY,
    article_id         bigint NOT NULL REFERENCES articles (id),
    version            integer NOT NULL,
    method             text NOT NULL
                       CHECK (method IN ('url', 'alias', 'exact', 'near', 'update', 'unique')),
    score              real NOT NULL,
    matched_article_id bigint REFERENCES articles (id),
    story_id           bigint REFERENCES stories (id),
    evidence           jsonb NOT NULL DEFAULT '{}',
    rules_version      text NOT NULL,
    decided_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dedup_decisions_article_idx ON dedup_decisions (article_id);

-- What changed in the story graph, in order, for consumers to follow (the change feed picks
-- these up): story_created, member_added, story_merged, story_split,
-- representative_changed, article_version, article_updated.
CREATE TABLE story_changes (
    id               bigserial PRIMARY KEY,
    kind             text NOT NULL CHECK (kind IN ('story_created', 'member_added',
                     'story_merged', 'story_split', 'representative_changed',
                     'article_version', 'article_updated')),
    story_id         bigint REFERENCES stories (id),
    article_id       bigint REFERENCES articles (id),
    other_story_id   bigint REFERENCES stories (id),
    other_article_id bigint REFERENCES articles (id),
    detail           jsonb NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX story_changes_story_idx ON story_changes (story_id);

-- Every outlet: one row per stored article of a live story, keeping its own headline and URL.
CREATE VIEW story_members AS
SELECT a.story_id, a.id AS article_id, a.outlet, a.title AS headline, a.canonical_url AS url,
       a.language, a.published_at, a.version, a.update_of, (s.representative_id = a.id) AS is_representative
FROM articles a
JOIN stories s ON s.id = a.story_id
WHERE a.state = 'stored' AND s.merged_into IS NULL;

-- One row per story: its representative, and every outlet that carried it.
CREATE VIEW story_digest AS
SELECT s.id AS story_id, s.member_count, r.id AS article_id, r.title AS headline,
       r.canonical_url AS url, r.outlet, r.language, r.published_at, r.body,
       (SELECT array_agg(DISTINCT m.outlet) FROM articles m
         WHERE m.story_id = s.id AND m.state = 'stored') AS outlets,
       s.created_at, s.updated_at
FROM stories s
JOIN articles r ON r.id = s.representative_id
WHERE s.merged_into IS NULL;

-- What labels and round links should follow: every article (duplicates included) mapped to
-- the newest article of its update chain, with that article's current version.
CREATE VIEW article_latest AS
SELECT a.id AS article_id, l.id AS latest_id, l.version AS latest_version, l.story_id
FROM articles a
JOIN articles l ON l.id = COALESCE(a.latest_id, a.duplicate_of, a.id)
WHERE a.state IN ('stored', 'duplicate');
