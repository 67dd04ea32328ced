-- talkwire_v1, continued: labels and facts, round links and timelines, stories with their
-- members and versions. Views over internal tables, so the internals can change under them.
-- Grants: 0005 set default privileges, so talkwire_reader can read these and nothing else.

-- Each stored article's label, score and tracks, with the rules that decided them.
CREATE VIEW talkwire_v1.article_labels AS
SELECT l.article_id, l.label, l.score, l.tracks, l.rules_version, l.classified_at
FROM article_labels l
JOIN articles a ON a.id = l.article_id AND a.state = 'stored';

-- Every extracted fact with its evidence: the span indexes title || E'\n\n' || text.
CREATE VIEW talkwire_v1.article_facts AS
SELECT f.article_id, f.kind, f.value, f.role, f.side, f.track, f.number, f.relation,
       f.date_start, f.date_end, f.span_start, f.span_end, f.evidence, f.rules_version
FROM article_facts f
JOIN articles a ON a.id = f.article_id AND a.state = 'stored';

-- The registry, each round with its neighbours in its track.
CREATE VIEW talkwire_v1.rounds AS
SELECT id AS round_id, track, number, name, start_date, end_date, venue, status, source,
       source_article_id, provenance, previous_round_id, next_round_id, updated_at
FROM round_sequence;

CREATE VIEW talkwire_v1.round_links AS
SELECT article_id, round_id, relation, confidence, method, evidence, span_start, span_end,
       rules_version, linked_at
FROM round_links;

-- A round's story: its facts, then its stories in order of publication.
CREATE VIEW talkwire_v1.round_timeline AS
SELECT round_id, track, number, round_name, start_date, end_date, venue, status,
       previous_round_id, next_round_id, relation, confidence, evidence, article_id,
       published_at, outlet, headline, url
FROM round_timeline;

-- What consumers ask for most: stories about the talks, one row per article, with label,
-- tracks, story and the rounds it is about.
CREATE VIEW talkwire_v1.talks_stories AS
SELECT a.id AS article_id, a.story_id, a.title AS headline, a.canonical_url AS url,
       a.site_name AS outlet, a.language, a.published_at, l.label, l.score, l.tracks,
       (SELECT array_agg(r.round_id ORDER BY r.round_id) FROM round_links r
         WHERE r.article_id = a.id AND r.relation = 'about') AS about_rounds,
       l.rules_version
FROM articles a
JOIN article_labels l ON l.article_id = a.id
WHERE a.state = 'stored' AND l.label IN ('talks', 'related');

-- One row per story, and every outlet that carried it.
CREATE VIEW talkwire_v1.stories AS
SELECT story_id, member_count, article_id AS representative_id, headline, url, outlet,
       language, published_at, outlets, created_at, updated_at
FROM story_digest;

CREATE VIEW talkwire_v1.story_members AS
SELECT story_id, article_id, outlet, headline, url, language, published_at, version,
       update_of, is_representative
FROM story_members;

CREATE VIEW talkwire_v1.article_versions AS
SELECT article_id, version, title, diff_summary, material, final_url, created_at
FROM article_versions;
