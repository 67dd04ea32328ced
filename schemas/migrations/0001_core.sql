-- talkwire core tables: feeds, the articles they lead to, and every sighting of an entry.
-- Append-only: later changes go in new numbered files, never edits to this one.

CREATE TABLE feeds (
    id                   bigserial PRIMARY KEY,
    url                  text NOT NULL UNIQUE,
    title                text,
    site_url             text,
    source               text NOT NULL DEFAULT 'cli',      -- cli | opml | demo | discovery
    status               text NOT NULL DEFAULT 'active'
                         CHECK (status IN ('active', 'broken', 'paused')),
    etag                 text,
    last_modified        text,
    body_hash            text,
    last_status          integer,
    last_reason          text,                              -- stable code, e.g. http_503
    last_error           text,                              -- human detail
    consecutive_failures integer NOT NULL DEFAULT 0,
    interval_seconds     integer NOT NULL DEFAULT 900,
    interval_reason      text NOT NULL DEFAULT 'default',
    next_poll_at         timestamptz NOT NULL DEFAULT now(),
    claimed_at           timestamptz,                        -- set while a poll is in flight
    last_polled_at       timestamptz,
    last_success_at      timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now()
);

-- The claim query reads due active feeds in next_poll_at order (SKIP LOCKED); this index keeps
-- that a range scan however many feeds there are.
CREATE INDEX feeds_due_idx ON feeds (next_poll_at) WHERE status = 'active';

CREATE TABLE articles (
    id                bigserial PRIMARY KEY,
    url               text NOT NULL UNIQUE,
    state             text NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending', 'stored', 'failed')),
    origin            text NOT NULL DEFAULT 'feed',         -- feed | cli | producer
    attempts          integer NOT NULL DEFAULT 0,
    enqueued_at       timestamptz,                           -- last time a task was sent
    leased_until      timestamptz,                           -- a worker holds it until then
    fail_reason       text,
    fail_detail       text,
    discovered_at     timestamptz NOT NULL DEFAULT now(),
    feed_title        text,
    feed_published_at timestamptz,
    -- filled when stored
    final_url         text,
    canonical_url     text,
    http_status       integer,
    title             text,
    body              text,
    author            text,
    site_name         text,
    language          text,
    description       text,
    published_at      timestamptz,
    content_hash      text,
    extractor         text,
    extract_warnings  text[] NOT NULL DEFAULT '{}',
    fetched_at        timestamptz,
    stored_at         timestamptz
);

-- The sweeper looks for pending work whose lease or send has gone stale.
CREATE INDEX articles_pending_idx ON articles (enqueued_at) WHERE state = 'pending';
CREATE INDEX articles_failed_reason_idx ON articles (fail_reason) WHERE state = 'failed';
CREATE INDEX articles_stored_at_idx ON articles (stored_at) WHERE state = 'stored';

-- Every feed that carried an entry, and when: a sighting, not a copy of the article.
CREATE TABLE entries (
    feed_id       bigint NOT NULL REFERENCES feeds (id) ON DELETE CASCADE,
    entry_key     text NOT NULL,                             -- hash of guid, else link, else title+date
    guid          text,
    url           text NOT NULL,
    title         text,
    published_at  timestamptz,
    article_id    bigint NOT NULL REFERENCES articles (id),
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (feed_id, entry_key)
);

CREATE INDEX entries_article_idx ON entries (article_id);
