-- The registry of negotiation rounds, and typed links from stories to them.
-- Every field of a round says where it came from (seed data or an article), and every
-- change to a round or a link is kept, so consumers can follow them.

CREATE TABLE tracks (
    id   text PRIMARY KEY,
    name text NOT NULL
);

CREATE TABLE rounds (
    id                text PRIMARY KEY,
    track             text NOT NULL REFERENCES tracks (id),
    number            integer,
    name              text NOT NULL,
    start_date        date,
    end_date          date,
    venue             text,
    status            text NOT NULL
                      CHECK (status IN ('announced', 'held', 'postponed', 'cancelled')),
    source            text NOT NULL CHECK (source IN ('seed', 'article')),
    source_article_id bigint REFERENCES articles (id) ON DELETE SET NULL,
    -- Per field: {"start_date": {"source": "seed"}} or {"source": "article", "article_id": 7}.
    provenance        jsonb NOT NULL DEFAULT '{}',
    note              text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CHECK (end_date IS NULL OR start_date IS NULL OR end_date >= start_date)
);

-- The linker reads a track's rounds in date order; so do the timeline views.
CREATE INDEX rounds_track_start_idx ON rounds (track, start_date);

CREATE TABLE round_changes (
    id         bigserial PRIMARY KEY,
    round_id   text NOT NULL REFERENCES rounds (id) ON DELETE CASCADE,
    change     text NOT NULL,            -- created | dates_changed | status_changed | seed_updated
    old_value  jsonb,
    new_value  jsonb,
    article_id bigint REFERENCES articles (id) ON DELETE SET NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE round_links (
    article_id    bigint NOT NULL REFERENCES articles (id) ON DELETE CASCADE,
    round_id      text NOT NULL REFERENCES rounds (id) ON DELETE CASCADE,
    relation      text NOT NULL CHECK (relation IN ('about', 'refers_to', 'announces')),
    confidence    real NOT NULL,
    method        text NOT NULL,
    evidence      text NOT NULL,
    span_start    integer NOT NULL,
    span_end      integer NOT NULL,
    rules_version text NOT NULL,
    linked_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (article_id, round_id, relation)
);

CREATE INDEX round_links_round_idx ON round_links (round_id, relation);

CREATE TABLE round_link_changes (
    id            bigserial PRIMARY KEY,
    article_id    bigint NOT NULL REFERENCES articles (id) ON DELETE CASCADE,
    round_id      text NOT NULL,
    relation      text NOT NULL,
    change        text NOT NULL CHECK (change IN ('added', 'removed')),
    confidence    real,
    rules_version text NOT NULL,
    changed_at    timestamptz NOT NULL DEFAULT now()
);

-- Each round with its neighbours in the same track (cancelled rounds are skipped).
CREATE VIEW round_sequence AS
SELECT r.*,
       lag(r.id)  OVER w AS previous_round_id,
       lead(r.id) OVER w AS next_round_id
FROM rounds r
WHERE r.status <> 'cancelled'
WINDOW w AS (PARTITION BY r.track ORDER BY r.start_date NULLS LAST, r.number NULLS LAST, r.id);

-- A round's story: its stories in order of publication, with relation, outlet and headline.
CREATE VIEW round_timeline AS
SELECT s.id AS round_id, s.track, s.number, s.name AS round_name, s.start_date, s.end_date,
       s.venue, s.status, s.previous_round_id, s.next_round_id,
       l.relation, l.confidence, l.evidence,
       a.id AS article_id, a.published_at, a.site_name AS outlet, a.title AS headline,
       a.url
FROM round_sequence s
JOIN round_links l ON l.round_id = s.id
JOIN articles a ON a.id = l.article_id;
