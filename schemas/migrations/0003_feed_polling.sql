-- Feed polling (issue 3): claim slots, validators and hints kept between polls, the host for
-- per-host politeness, a bounded log of recent polls per feed, and sighting counts.

ALTER TABLE feeds
    -- The URL's host, lower-cased; derived in the database so a 301 that rewrites url moves
    -- the feed to its new host without any code having to remember it.
    ADD COLUMN host text GENERATED ALWAYS AS (
        nullif(lower(substring(url FROM
            '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?(\[[^]/?#]*\]|[^:/?#]*)')), '')) STORED,
    -- Bumped by every claim. A poll message carries the slot it was claimed for, and every
    -- write of its result is conditional on it, so a redelivered or late message is stale:
    -- one poll per feed per slot however many beats or pollers run.
    ADD COLUMN poll_slot bigint NOT NULL DEFAULT 0,
    ADD COLUMN poll_started_at timestamptz,              -- set while the slot's fetch runs
    -- Last GET sent without validators: a periodic unconditional fetch catches servers that
    -- answer 304 although the feed changed.
    ADD COLUMN last_full_fetch_at timestamptz,
    -- The publisher's own pacing (RSS <ttl>, sy:updatePeriod) from the last parsed body, kept
    -- so a 304 still honours it.
    ADD COLUMN ttl_seconds integer,
    ADD COLUMN category text;                             -- OPML folder, kept for export

-- Operators and the politeness report group feeds by host.
CREATE INDEX feeds_host_idx ON feeds (host);

-- The last few polls of each feed (kept to TALKWIRE_POLL_LOG_KEEP rows per feed).
CREATE TABLE feed_polls (
    id              bigserial PRIMARY KEY,
    feed_id         bigint NOT NULL REFERENCES feeds (id) ON DELETE CASCADE,
    polled_at       timestamptz NOT NULL DEFAULT now(),
    outcome         text NOT NULL,            -- polled | not_modified | unchanged | failed
    http_status     integer,
    reason          text,                     -- stable code on failure, e.g. http_503
    detail          text,
    conditional     boolean NOT NULL,         -- If-None-Match / If-Modified-Since were sent
    parsed          boolean NOT NULL,         -- the body went through the parser
    entries         integer NOT NULL DEFAULT 0,
    new_entries     integer NOT NULL DEFAULT 0,
    bytes           integer,
    duration_ms     integer,
    next_poll_in    integer,                  -- seconds until the next poll, jitter included
    interval_reason text
);

-- "Recent polls of one feed" and the pruning after each insert both walk this index.
CREATE INDEX feed_polls_feed_idx ON feed_polls (feed_id, id DESC);

-- How many polls saw this entry in this feed (first_seen_at and last_seen_at bound them).
ALTER TABLE entries ADD COLUMN times_seen integer NOT NULL DEFAULT 1;

-- A GUID that rotates while the link stays is the same entry: sightings are matched on the
-- entry key or on the link within one feed.
CREATE INDEX entries_feed_url_idx ON entries (feed_id, url);
