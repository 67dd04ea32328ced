"""All SQL in one place: one function per statement, rows returned typed.

Callers own the transaction: every function takes a connection and never commits, so the
pipeline can put several statements in one transaction and enqueue only after it commits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg
from psycopg.rows import class_row, dict_row
from psycopg.types.json import Jsonb

from worker.poll import entry_key
from worker.types import Article, FeedEntry, Page

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "schemas" / "migrations"
# Any constant works; it only has to be the same in every process that migrates.
_MIGRATION_LOCK = 0x7461_6C6B  # "talk"


@dataclass(frozen=True)
class FeedRow:
    """A feed as stored, with its health and schedule."""

    id: int
    url: str
    title: str | None
    source: str
    status: str
    etag: str | None
    last_modified: str | None
    body_hash: str | None
    last_status: int | None
    last_reason: str | None
    last_error: str | None
    consecutive_failures: int
    interval_seconds: int
    interval_reason: str
    next_poll_at: datetime
    claimed_at: datetime | None
    last_polled_at: datetime | None
    last_success_at: datetime | None


@dataclass(frozen=True)
class ArticleRow:
    """An article as stored: its processing state and, once stored, its content."""

    id: int
    url: str
    state: str
    origin: str
    attempts: int
    fail_reason: str | None
    fail_detail: str | None
    title: str | None
    body: str | None
    author: str | None
    site_name: str | None
    language: str | None
    published_at: datetime | None
    final_url: str | None
    canonical_url: str | None
    stored_at: datetime | None


# Column lists are spelled out in each statement (no string building), matching the row
# dataclasses above field for field.


# --- migrations -------------------------------------------------------------------------


def apply_migrations(conn: psycopg.Connection, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply pending numbered .sql migrations under an advisory lock; return those applied."""
    applied: list[str] = []
    conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.commit()
        done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
        for path in sorted(directory.glob("[0-9][0-9][0-9][0-9]_*.sql")):
            if path.stem in done:
                continue
            with conn.transaction():
                conn.execute(path.read_text(encoding="utf-8").encode())
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (path.stem,))
            applied.append(path.stem)
        conn.commit()
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
        conn.commit()
    return applied


# --- feeds ------------------------------------------------------------------------------


def add_feed(conn: psycopg.Connection, url: str, *, title: str | None = None,
             source: str = "cli", interval_seconds: int = 900) -> FeedRow:
    """Insert a feed or return the existing one with that URL."""
    with conn.cursor(row_factory=class_row(FeedRow)) as cur:
        cur.execute(
            "INSERT INTO feeds (url, title, source, interval_seconds) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (url) DO UPDATE SET title = COALESCE(feeds.title, EXCLUDED.title)"
            " RETURNING id, url, title, source, status, etag, last_modified, body_hash,"
            " last_status, last_reason, last_error, consecutive_failures, interval_seconds,"
            " interval_reason, next_poll_at, claimed_at, last_polled_at, last_success_at",
            (url, title, source, interval_seconds),
        )
        row = cur.fetchone()
    assert row is not None
    return row


def list_feeds(conn: psycopg.Connection) -> list[FeedRow]:
    """Every feed, oldest first."""
    with conn.cursor(row_factory=class_row(FeedRow)) as cur:
        cur.execute(
            "SELECT id, url, title, source, status, etag, last_modified, body_hash,"
            " last_status, last_reason, last_error, consecutive_failures, interval_seconds,"
            " interval_reason, next_poll_at, claimed_at, last_polled_at, last_success_at"
            " FROM feeds ORDER BY id"
        )
        return cur.fetchall()


def get_feed(conn: psycopg.Connection, feed_id: int) -> FeedRow | None:
    """One feed by id, or None."""
    with conn.cursor(row_factory=class_row(FeedRow)) as cur:
        cur.execute(
            "SELECT id, url, title, source, status, etag, last_modified, body_hash,"
            " last_status, last_reason, last_error, consecutive_failures, interval_seconds,"
            " interval_reason, next_poll_at, claimed_at, last_polled_at, last_success_at"
            " FROM feeds WHERE id = %s",
            (feed_id,),
        )
        return cur.fetchone()


def make_feeds_due(conn: psycopg.Connection) -> int:
    """Mark every active feed due now (for a one-shot pass); return how many."""
    cur = conn.execute("UPDATE feeds SET next_poll_at = now() WHERE status = 'active'")
    return cur.rowcount


def claim_due_feeds(conn: psycopg.Connection, *, limit: int, lease_seconds: int) -> list[FeedRow]:
    """Claim due active feeds; each is pushed a lease ahead so no other claimer takes it."""
    # SKIP LOCKED lets two beats (or a beat and `run --once`) claim disjoint sets; the lease in
    # next_poll_at means a poll whose message is lost is claimed again once it expires.
    with conn.cursor(row_factory=class_row(FeedRow)) as cur:
        cur.execute(
            "WITH due AS ("
            "  SELECT id FROM feeds WHERE status = 'active' AND next_poll_at <= now()"
            "  ORDER BY next_poll_at LIMIT %s FOR UPDATE SKIP LOCKED)"
            " UPDATE feeds f SET next_poll_at = now() + make_interval(secs => %s),"
            "   claimed_at = now()"
            " FROM due WHERE f.id = due.id"
            " RETURNING f.id, f.url, f.title, f.source, f.status, f.etag, f.last_modified,"
            " f.body_hash, f.last_status, f.last_reason, f.last_error, f.consecutive_failures,"
            " f.interval_seconds, f.interval_reason, f.next_poll_at, f.claimed_at,"
            " f.last_polled_at, f.last_success_at",
            (limit, lease_seconds),
        )
        return cur.fetchall()


def record_poll_success(conn: psycopg.Connection, feed_id: int, *, status: int,
                        etag: str | None, last_modified: str | None, body_hash: str | None,
                        title: str | None, interval_seconds: int, interval_reason: str,
                        moved_to: str | None) -> None:
    """Record a successful poll: validators, health reset, and the next poll time."""
    conn.execute(
        "UPDATE feeds SET last_status = %s, etag = COALESCE(%s, etag),"
        " last_modified = COALESCE(%s, last_modified), body_hash = COALESCE(%s, body_hash),"
        " title = COALESCE(title, %s), last_reason = NULL, last_error = NULL,"
        " consecutive_failures = 0, interval_seconds = %s, interval_reason = %s,"
        " next_poll_at = now() + make_interval(secs => %s), claimed_at = NULL,"
        " last_polled_at = now(), last_success_at = now(),"
        " url = CASE WHEN %s::text IS NULL OR EXISTS (SELECT 1 FROM feeds o WHERE o.url = %s::text)"
        "        THEN url ELSE %s::text END"
        " WHERE id = %s",
        (status, etag, last_modified, body_hash, title, interval_seconds, interval_reason,
         interval_seconds, moved_to, moved_to, moved_to, feed_id),
    )


def record_poll_failure(conn: psycopg.Connection, feed_id: int, *, reason: str, detail: str,
                        status: int | None, broken: bool, retry_in: int) -> None:
    """Record a failed poll; a hard failure marks the feed broken, a soft one backs off."""
    conn.execute(
        "UPDATE feeds SET last_status = %s, last_reason = %s, last_error = %s,"
        " consecutive_failures = consecutive_failures + 1,"
        " status = CASE WHEN %s THEN 'broken' ELSE status END,"
        " interval_reason = %s, next_poll_at = now() + make_interval(secs => %s),"
        " claimed_at = NULL, last_polled_at = now()"
        " WHERE id = %s",
        (status, reason, detail[:1000], broken, f"backoff:{reason}", retry_in, feed_id),
    )


def record_entries(conn: psycopg.Connection, feed_id: int,
                   entries: Iterable[FeedEntry]) -> list[int]:
    """Record sightings of feed entries; return the ids of articles that are new."""
    new_ids: list[int] = []
    with conn.cursor() as cur:
        for entry in entries:
            if not entry.url:
                continue
            cur.execute(
                # enqueued_at is set in the same transaction: the task is sent right after
                # commit, and the sweeper resends only if that send was lost.
                "INSERT INTO articles (url, origin, feed_title, feed_published_at, enqueued_at)"
                " VALUES (%s, 'feed', %s, %s, now()) ON CONFLICT (url) DO NOTHING RETURNING id",
                (entry.url, entry.title, entry.published),
            )
            row = cur.fetchone()
            if row is not None:
                new_ids.append(row[0])
            cur.execute(
                "INSERT INTO entries (feed_id, entry_key, guid, url, title, published_at, article_id)"
                " SELECT %s, %s, %s, %s, %s, %s, id FROM articles WHERE url = %s"
                " ON CONFLICT (feed_id, entry_key) DO UPDATE SET last_seen_at = now()",
                (feed_id, entry_key(entry), entry.guid, entry.url, entry.title,
                 entry.published, entry.url),
            )
    return new_ids


# --- articles ---------------------------------------------------------------------------


def add_article_url(conn: psycopg.Connection, url: str, *, origin: str) -> tuple[int, bool]:
    """Insert an article URL to process; return its id and whether it is new."""
    row = conn.execute(
        "INSERT INTO articles (url, origin, enqueued_at) VALUES (%s, %s, now())"
        " ON CONFLICT (url) DO NOTHING RETURNING id",
        (url, origin),
    ).fetchone()
    if row is not None:
        return row[0], True
    existing = conn.execute("SELECT id FROM articles WHERE url = %s", (url,)).fetchone()
    assert existing is not None
    return existing[0], False


def get_article(conn: psycopg.Connection, article_id: int) -> ArticleRow | None:
    """One article by id, or None."""
    with conn.cursor(row_factory=class_row(ArticleRow)) as cur:
        cur.execute(
            "SELECT id, url, state, origin, attempts, fail_reason, fail_detail, title, body,"
            " author, site_name, language, published_at, final_url, canonical_url, stored_at"
            " FROM articles WHERE id = %s",
            (article_id,),
        )
        return cur.fetchone()


def lease_article(conn: psycopg.Connection, article_id: int, *,
                  lease_seconds: int) -> ArticleRow | None:
    """Take the lease on a pending article; None if it is done or another worker holds it."""
    # The conditional UPDATE is the guard against a redelivered message running twice.
    with conn.cursor(row_factory=class_row(ArticleRow)) as cur:
        cur.execute(
            "UPDATE articles SET leased_until = now() + make_interval(secs => %s),"
            " attempts = attempts + 1"
            " WHERE id = %s AND state = 'pending'"
            "   AND (leased_until IS NULL OR leased_until < now())"
            " RETURNING id, url, state, origin, attempts, fail_reason, fail_detail, title, body,"
            " author, site_name, language, published_at, final_url, canonical_url, stored_at",
            (lease_seconds, article_id),
        )
        return cur.fetchone()


def store_article(conn: psycopg.Connection, article_id: int, page: Page,
                  article: Article) -> bool:
    """Store extracted content and mark the article stored; False if it was not pending."""
    content_hash = hashlib.sha256(article.text.encode("utf-8")).hexdigest()
    cur = conn.execute(
        "UPDATE articles SET state = 'stored', final_url = %s, canonical_url = %s,"
        " http_status = %s, title = %s, body = %s, author = %s, site_name = %s, language = %s,"
        " description = %s, published_at = COALESCE(%s, feed_published_at),"
        " content_hash = %s, extractor = %s, extract_warnings = %s, fetched_at = now(),"
        " stored_at = now(), leased_until = NULL, fail_reason = NULL, fail_detail = NULL"
        " WHERE id = %s AND state = 'pending'",
        (page.final_url, article.canonical_url, page.status, article.title, article.text,
         article.author, article.site_name, article.language, article.description,
         article.published, content_hash, article.extractor, list(article.warnings),
         article_id),
    )
    return cur.rowcount == 1


def fail_article(conn: psycopg.Connection, article_id: int, *, reason: str, detail: str) -> None:
    """Mark an article failed for good with a stable reason code."""
    conn.execute(
        "UPDATE articles SET state = 'failed', fail_reason = %s, fail_detail = %s,"
        " leased_until = NULL WHERE id = %s AND state = 'pending'",
        (reason, detail[:1000], article_id),
    )


def release_article(conn: psycopg.Connection, article_id: int, *, reason: str,
                    detail: str) -> None:
    """Give up the lease after a transient failure so a retry can take it; keep the reason."""
    conn.execute(
        "UPDATE articles SET leased_until = NULL, fail_reason = %s, fail_detail = %s"
        " WHERE id = %s AND state = 'pending'",
        (reason, detail[:1000], article_id),
    )


def sweep_stale_articles(conn: psycopg.Connection, *, stale_seconds: int,
                         limit: int) -> list[int]:
    """Pick pending articles whose task was lost (no live lease, sent long ago) to resend."""
    rows = conn.execute(
        "WITH stale AS ("
        "  SELECT id FROM articles WHERE state = 'pending'"
        "   AND (leased_until IS NULL OR leased_until < now())"
        "   AND (enqueued_at IS NULL OR enqueued_at < now() - make_interval(secs => %s))"
        "  ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)"
        " UPDATE articles a SET enqueued_at = now() FROM stale WHERE a.id = stale.id"
        " RETURNING a.id",
        (stale_seconds, limit),
    ).fetchall()
    return [r[0] for r in rows]


def count_outstanding(conn: psycopg.Connection) -> tuple[int, int]:
    """How many feed polls are in flight and how many articles are still pending."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM feeds WHERE claimed_at IS NOT NULL AND status = 'active'),"
        "       (SELECT count(*) FROM articles WHERE state = 'pending')"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def summarize_since(conn: psycopg.Connection, since: datetime) -> dict[str, object]:
    """Counts for a run summary: feeds polled, entries seen, articles stored, failures by reason."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT"
            " (SELECT count(*) FROM feeds WHERE last_polled_at >= %(s)s) AS feeds_polled,"
            " (SELECT count(*) FROM feeds WHERE last_polled_at >= %(s)s"
            "   AND last_reason IS NOT NULL) AS feeds_failed,"
            " (SELECT count(*) FROM entries WHERE last_seen_at >= %(s)s) AS entries_seen,"
            " (SELECT count(*) FROM entries WHERE first_seen_at >= %(s)s) AS entries_new,"
            " (SELECT count(*) FROM articles WHERE stored_at >= %(s)s) AS articles_stored,"
            " (SELECT count(*) FROM articles WHERE state = 'stored') AS articles_total,"
            " (SELECT count(*) FROM articles WHERE state = 'pending') AS articles_pending",
            {"s": since},
        )
        summary: dict[str, object] = dict(cur.fetchone() or {})
        cur.execute(
            "SELECT 'article' AS kind, fail_reason AS reason, count(*) AS n FROM articles"
            " WHERE state = 'failed' AND discovered_at >= %(s)s GROUP BY fail_reason"
            " UNION ALL"
            " SELECT 'feed', last_reason, count(*) FROM feeds"
            " WHERE last_polled_at >= %(s)s AND last_reason IS NOT NULL GROUP BY last_reason"
            " ORDER BY 1, 3 DESC",
            {"s": since},
        )
        summary["failures"] = [(r["kind"], r["reason"], r["n"]) for r in cur.fetchall()]
    return summary


# --- producer contracts: submissions and dead letters (issue 7) -------------------------


@dataclass(frozen=True)
class SubmissionClaim:
    """The outcome of recording a producer message under its idempotency key."""

    id: int
    fresh: bool  # False: the key was seen before and only its duplicate count went up
    payload_sha256: str  # of the first message under this key
    article_id: int | None


@dataclass(frozen=True)
class DeadLetterRow:
    """A rejected message as stored (payload only when asked for)."""

    id: int
    received_at: datetime
    via: str
    source_ref: str | None
    kind: str | None
    producer: str | None
    reason: str
    detail: str
    payload_size: int
    payload_sha256: str
    payload_truncated: bool
    replayed_at: datetime | None
    replay_outcome: str | None
    payload: bytes | None = None


@dataclass(frozen=True)
class ChangeRow:
    """One entry of the change feed."""

    id: int
    event: str
    entity: str
    entity_id: int
    payload: dict[str, object]
    created_at: datetime


def claim_submission(conn: psycopg.Connection, *, producer: str, idempotency_key: str,
                     kind: str, schema_version: int, via: str, source_ref: str | None,
                     payload_sha256: str, hints: dict[str, str]) -> SubmissionClaim:
    """Record a message under (producer, key); a key seen before only counts a duplicate."""
    with conn.cursor(row_factory=class_row(SubmissionClaim)) as cur:
        cur.execute(
            "INSERT INTO submissions (producer, idempotency_key, kind, schema_version, via,"
            " source_ref, payload_sha256, hints) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (producer, idempotency_key) DO UPDATE"
            " SET duplicates = submissions.duplicates + 1, last_duplicate_at = now()"
            " RETURNING id, duplicates = 0 AS fresh, payload_sha256, article_id",
            (producer, idempotency_key, kind, schema_version, via, source_ref, payload_sha256,
             Jsonb(hints)),
        )
        row = cur.fetchone()
    assert row is not None
    return row


def link_submission(conn: psycopg.Connection, submission_id: int, article_id: int) -> None:
    """Point a submission at the article it became."""
    conn.execute("UPDATE submissions SET article_id = %s WHERE id = %s",
                 (article_id, submission_id))


def fill_article_hints(conn: psycopg.Connection, article_id: int) -> int:
    """Fill a stored article's empty date, language and site name from its first submission."""
    # The page wins where it says something; a producer's hint only fills a gap.
    cur = conn.execute(
        "UPDATE articles a SET"
        " published_at = COALESCE(a.published_at, (s.hints->>'published_at')::timestamptz),"
        " language = COALESCE(a.language, s.hints->>'language'),"
        " site_name = COALESCE(a.site_name, s.hints->>'source_name')"
        " FROM (SELECT hints FROM submissions WHERE article_id = %s AND hints <> '{}'"
        "       ORDER BY id LIMIT 1) s"
        " WHERE a.id = %s",
        (article_id, article_id),
    )
    return cur.rowcount


def record_dead_letter(conn: psycopg.Connection, *, via: str, source_ref: str | None,
                       kind: str | None, producer: str | None, reason: str, detail: str,
                       payload: bytes, payload_size: int, payload_sha256: str,
                       payload_truncated: bool) -> int | None:
    """Store a rejected message; None if this delivery (via, source_ref) is already stored."""
    row = conn.execute(
        "INSERT INTO dead_letters (via, source_ref, kind, producer, reason, detail, payload,"
        " payload_size, payload_sha256, payload_truncated)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (via, source_ref) WHERE source_ref IS NOT NULL DO NOTHING RETURNING id",
        (via, source_ref, kind, producer, reason, detail[:2000], payload, payload_size,
         payload_sha256, payload_truncated),
    ).fetchone()
    return row[0] if row else None


def list_dead_letters(conn: psycopg.Connection, *, limit: int, reason: str | None = None,
                      producer: str | None = None) -> list[DeadLetterRow]:
    """The newest dead letters, optionally of one reason or producer, without payloads."""
    with conn.cursor(row_factory=class_row(DeadLetterRow)) as cur:
        cur.execute(
            "SELECT id, received_at, via, source_ref, kind, producer, reason, detail,"
            " payload_size, payload_sha256, payload_truncated, replayed_at, replay_outcome"
            " FROM dead_letters"
            " WHERE (%(reason)s::text IS NULL OR reason = %(reason)s)"
            "   AND (%(producer)s::text IS NULL OR producer = %(producer)s)"
            " ORDER BY id DESC LIMIT %(limit)s",
            {"reason": reason, "producer": producer, "limit": limit},
        )
        return cur.fetchall()


def get_dead_letter(conn: psycopg.Connection, dead_letter_id: int) -> DeadLetterRow | None:
    """One dead letter with its payload, or None."""
    with conn.cursor(row_factory=class_row(DeadLetterRow)) as cur:
        cur.execute(
            "SELECT id, received_at, via, source_ref, kind, producer, reason, detail,"
            " payload_size, payload_sha256, payload_truncated, replayed_at, replay_outcome,"
            " payload FROM dead_letters WHERE id = %s",
            (dead_letter_id,),
        )
        return cur.fetchone()


def mark_dead_letter_replayed(conn: psycopg.Connection, dead_letter_id: int, outcome: str) -> None:
    """Record when a dead letter was replayed and what became of it."""
    conn.execute("UPDATE dead_letters SET replayed_at = now(), replay_outcome = %s WHERE id = %s",
                 (outcome[:500], dead_letter_id))


# --- change feed (issue 7) --------------------------------------------------------------

CHANGE_EVENTS = ("article_created", "article_updated", "story_merged", "round_link_changed",
                 "round_created", "round_updated")
CHANGES_CHANNEL = "talkwire_changes"


def append_change(conn: psycopg.Connection, event: str, entity: str, entity_id: int,
                  payload: dict[str, object]) -> int:
    """Append a change in the caller's transaction; NOTIFY on commit. Call it last: it locks."""
    # The table's trigger takes the id under a transaction-level advisory lock, so ids become
    # visible in increasing order (see 0005_contracts.sql); that lock is held until commit.
    row = conn.execute(
        "INSERT INTO changes (event, entity, entity_id, payload) VALUES (%s, %s, %s, %s)"
        " RETURNING id",
        (event, entity, entity_id, Jsonb(payload)),
    ).fetchone()
    assert row is not None
    return int(row[0])


def listen_changes(conn: psycopg.Connection) -> None:
    """LISTEN on the change feed's channel (the connection must be in autocommit mode)."""
    conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(CHANGES_CHANNEL)))


def list_changes(conn: psycopg.Connection, *, since: int, limit: int) -> list[ChangeRow]:
    """Changes with an id above `since`, oldest first."""
    with conn.cursor(row_factory=class_row(ChangeRow)) as cur:
        cur.execute(
            "SELECT id, event, entity, entity_id, payload, created_at FROM changes"
            " WHERE id > %s ORDER BY id LIMIT %s",
            (since, limit),
        )
        return cur.fetchall()
