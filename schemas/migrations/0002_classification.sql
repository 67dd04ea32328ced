-- What each stored article is about: one label row per article, and its facts with evidence.
-- Every row records the rules version that made it, so history can be reprocessed.

CREATE TABLE article_labels (
    article_id    bigint PRIMARY KEY REFERENCES articles (id) ON DELETE CASCADE,
    label         text NOT NULL CHECK (label IN ('talks', 'related', 'syria_other', 'other')),
    score         real NOT NULL,
    tracks        text[] NOT NULL DEFAULT '{}',
    rules_version text NOT NULL,
    classified_at timestamptz NOT NULL DEFAULT now(),
    detail        jsonb NOT NULL                       -- the whole decision, evidence included
);

-- Consumers ask for "talks stories" far more than anything else.
CREATE INDEX article_labels_label_idx ON article_labels (label, article_id);
CREATE INDEX article_labels_tracks_idx ON article_labels USING gin (tracks);

-- One row per extracted fact, queryable without unpacking JSON.
CREATE TABLE article_facts (
    id            bigserial PRIMARY KEY,
    article_id    bigint NOT NULL REFERENCES articles (id) ON DELETE CASCADE,
    kind          text NOT NULL CHECK (kind IN ('track', 'round', 'date', 'venue', 'actor')),
    value         text,                                -- track id, venue or actor name
    role          text,                                -- actor role
    side          text,                                -- actor side
    track         text,                                -- round mentions
    number        integer,
    relation      text,                                -- current | earlier | upcoming
    date_start    date,
    date_end      date,
    span_start    integer NOT NULL,
    span_end      integer NOT NULL,
    evidence      text NOT NULL,
    rules_version text NOT NULL
);

CREATE INDEX article_facts_article_idx ON article_facts (article_id);
CREATE INDEX article_facts_kind_value_idx ON article_facts (kind, value);

-- A label that changed on reprocessing, so the change can be followed and counted.
CREATE TABLE label_changes (
    id                bigserial PRIMARY KEY,
    article_id        bigint NOT NULL REFERENCES articles (id) ON DELETE CASCADE,
    old_label         text,
    new_label         text NOT NULL,
    old_rules_version text,
    new_rules_version text NOT NULL,
    changed_at        timestamptz NOT NULL DEFAULT now()
);
