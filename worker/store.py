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
    # Added by migration 0003 (feed polling); defaults keep older column lists readable.
    site_url: str | None = None
    host: str | None = None
    poll_slot: int = 0
    poll_started_at: datetime | None = None
    last_full_fetch_at: datetime | None = None
    ttl_seconds: int | None = None
    category: str | None = None


@dataclass(frozen=True)
class PollRow:
    """One logged poll of a feed."""

    id: int
    feed_id: int
    polled_at: datetime
    outcome: str
    http_status: int | None
    reason: str | None
    detail: str | None
    conditional: bool
    parsed: bool
    entries: int
    new_entries: int
    bytes: int | None
    duration_ms: int | None
    next_poll_in: int | None
    interval_reason: str | None


@dataclass(frozen=True)
class FeedSummary:
    """A feed's line in `feeds list`: health, schedule and pace."""

    id: int
    status: str
    url: str
    title: str | None
    host: str | None
    interval_seconds: int
    interval_reason: str
    next_poll_at: datetime
    last_success_at: datetime | None
    consecutive_failures: int
    last_reason: str | None
    items_per_day: float


@dataclass(frozen=True)
class Sightings:
    """What recording one parsed document's entries did."""

    seen: int  # distinct entries in the document that have a link
    new_entries: int  # entries this feed never carried before
    new_article_ids: list[int]


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
             source: str = "cli", interval_seconds: int = 900,
             site_url: str | None = None, category: str | None = None) -> FeedRow:
    """Insert a feed or return the existing one with that URL."""
    with conn.cursor(row_factory=class_row(FeedRow)) as cur:
        cur.execute(
            "INSERT INTO feeds (url, title, source, interval_seconds, site_url, category)"
            " VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (url) DO UPDATE SET title = COALESCE(feeds.title, EXCLUDED.title),"
            "   site_url = COALESCE(feeds.site_url, EXCLUDED.site_url),"
            "   category = COALESCE(feeds.category, EXCLUDED.category)"
            " RETURNING id, url, title, source, status, etag, last_modified, body_hash,"
            " last_status, last_reason, last_error, consecutive_failures, interval_seconds,"
            " interval_reason, next_poll_at, claimed_at, last_polled_at, last_success_at,"
            " site_url, host, poll_slot, poll_started_at, last_full_fetch_at, ttl_seconds, category",
            (url, title, source, interval_seconds, site_url, category),
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
            " interval_reason, next_poll_at, claimed_at, last_polled_at, last_success_at,"
            " site_url, host, poll_slot, poll_started_at, last_full_fetch_at, ttl_seconds, category"
            " FROM feeds ORDER BY id"
        )
        return cur.fetchall()


def get_feed(conn: psycopg.Connection, feed_id: int) -> FeedRow | None:
    """One feed by id, or None."""
    with conn.cursor(row_factory=class_row(FeedRow)) as cur:
        cur.execute(
            "SELECT id, url, title, source, status, etag, last_modified, body_hash,"
            " last_status, last_reason, last_error, consecutive_failures, interval_seconds,"
            " interval_reason, next_poll_at, claimed_at, last_polled_at, last_success_at,"
            " site_url, host, poll_slot, poll_started_at, last_full_fetch_at, ttl_seconds, category"
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
    # next_poll_at means a poll whose message is lost is claimed again once it expires. Each
    # claim opens a new poll_slot, and only a message for the current slot may poll.
    with conn.cursor(row_factory=class_row(FeedRow)) as cur:
        cur.execute(
            "WITH due AS ("
            "  SELECT id FROM feeds WHERE status = 'active' AND next_poll_at <= now()"
            "  ORDER BY next_poll_at LIMIT %s FOR UPDATE SKIP LOCKED)"
            " UPDATE feeds f SET next_poll_at = now() + make_interval(secs => %s),"
            "   claimed_at = now(), poll_slot = f.poll_slot + 1, poll_started_at = NULL"
            " FROM due WHERE f.id = due.id"
            " RETURNING f.id, f.url, f.title, f.source, f.status, f.etag, f.last_modified,"
            " f.body_hash, f.last_status, f.last_reason, f.last_error, f.consecutive_failures,"
            " f.interval_seconds, f.interval_reason, f.next_poll_at, f.claimed_at,"
            " f.last_polled_at, f.last_success_at, f.site_url, f.host, f.poll_slot,"
            " f.poll_started_at, f.last_full_fetch_at, f.ttl_seconds, f.category",
            (limit, lease_seconds),
        )
        return cur.fetchall()


def claim_feed(conn: psycopg.Connection, feed_id: int, *, lease_seconds: int,
               take_over: bool = False) -> FeedRow | None:
    """Claim one feed now, whatever its status; None if a live claim holds it (unless take_over)."""
    # `feeds poll ID` takes over (the queued message then finds its slot gone); a message
    # without a slot only claims a feed nobody holds.
    with conn.cursor(row_factory=class_row(FeedRow)) as cur:
        cur.execute(
            "UPDATE feeds SET poll_slot = poll_slot + 1, claimed_at = now(),"
            " poll_started_at = NULL, next_poll_at = now() + make_interval(secs => %s)"
            " WHERE id = %s AND (%s OR claimed_at IS NULL OR next_poll_at <= now())"
            " RETURNING id, url, title, source, status, etag, last_modified, body_hash,"
            " last_status, last_reason, last_error, consecutive_failures, interval_seconds,"
            " interval_reason, next_poll_at, claimed_at, last_polled_at, last_success_at,"
            " site_url, host, poll_slot, poll_started_at, last_full_fetch_at, ttl_seconds, category",
            (lease_seconds, feed_id, take_over),
        )
        return cur.fetchone()


def begin_feed_poll(conn: psycopg.Connection, feed_id: int, *, slot: int,
                    lease_seconds: int) -> FeedRow | None:
    """Start the poll of a claimed slot; None if the slot is gone or already being polled."""
    # The conditional UPDATE is what makes a redelivered message harmless: only one caller
    # sees poll_started_at go from NULL to now for a given slot.
    with conn.cursor(row_factory=class_row(FeedRow)) as cur:
        cur.execute(
            "UPDATE feeds SET poll_started_at = now(),"
            " next_poll_at = now() + make_interval(secs => %s)"
            " WHERE id = %s AND poll_slot = %s AND claimed_at IS NOT NULL"
            "   AND poll_started_at IS NULL"
            " RETURNING id, url, title, source, status, etag, last_modified, body_hash,"
            " last_status, last_reason, last_error, consecutive_failures, interval_seconds,"
            " interval_reason, next_poll_at, claimed_at, last_polled_at, last_success_at,"
            " site_url, host, poll_slot, poll_started_at, last_full_fetch_at, ttl_seconds, category",
            (lease_seconds, feed_id, slot),
        )
        return cur.fetchone()


def defer_feed_poll(conn: psycopg.Connection, feed_id: int, *, slot: int, delay: float,
                    keep_claim: bool) -> bool:
    """Put off a started poll whose host is busy: keep the claim (a countdown will resume it)
    or give it up (beat claims the feed again once due); False if the slot is gone."""
    cur = conn.execute(
        "UPDATE feeds SET poll_started_at = NULL,"
        " claimed_at = CASE WHEN %s THEN claimed_at END,"
        " next_poll_at = now() + make_interval(secs => %s)"
        " WHERE id = %s AND poll_slot = %s",
        (keep_claim, delay, feed_id, slot),
    )
    return cur.rowcount == 1


def record_poll_success(conn: psycopg.Connection, feed_id: int, *, slot: int, status: int,
                        etag: str | None, last_modified: str | None, body_hash: str | None,
                        parsed: bool, title: str | None, site_url: str | None,
                        ttl_seconds: int | None, interval_seconds: int, interval_reason: str,
                        next_poll_in: int, moved_to: str | None, full_fetch: bool) -> bool:
    """Record a successful poll of a slot: validators, health reset, the next poll time;
    a hard-broken feed that answers again is active again. False if the slot is gone."""
    cur = conn.execute(
        "UPDATE feeds SET status = 'active', last_status = %(status)s,"
        # A 200 replaces the validators (a server may stop sending one); a 304 may refresh them.
        " etag = CASE WHEN %(status)s = 304 THEN COALESCE(%(etag)s, etag) ELSE %(etag)s END,"
        " last_modified = CASE WHEN %(status)s = 304 THEN COALESCE(%(lm)s, last_modified)"
        "   ELSE %(lm)s END,"
        " body_hash = COALESCE(%(hash)s, body_hash),"
        " ttl_seconds = CASE WHEN %(parsed)s THEN %(ttl)s ELSE ttl_seconds END,"
        " title = COALESCE(title, %(title)s), site_url = COALESCE(site_url, %(site)s),"
        " last_reason = NULL, last_error = NULL, consecutive_failures = 0,"
        " interval_seconds = %(interval)s, interval_reason = %(why)s,"
        " next_poll_at = now() + make_interval(secs => %(next)s),"
        " claimed_at = NULL, poll_started_at = NULL,"
        " last_polled_at = now(), last_success_at = now(),"
        " last_full_fetch_at = CASE WHEN %(full)s THEN now() ELSE last_full_fetch_at END,"
        # A 301/308 moves the feed, unless another feed already has that URL.
        " url = CASE WHEN %(moved)s::text IS NULL"
        "   OR EXISTS (SELECT 1 FROM feeds o WHERE o.url = %(moved)s::text)"
        "   THEN url ELSE %(moved)s::text END"
        " WHERE id = %(id)s AND poll_slot = %(slot)s",
        {"status": status, "etag": etag, "lm": last_modified, "hash": body_hash,
         "parsed": parsed, "ttl": ttl_seconds, "title": title, "site": site_url,
         "interval": interval_seconds, "why": interval_reason, "next": next_poll_in,
         "full": full_fetch, "moved": moved_to, "id": feed_id, "slot": slot},
    )
    return cur.rowcount == 1


def record_poll_failure(conn: psycopg.Connection, feed_id: int, *, slot: int, reason: str,
                        detail: str, status: int | None, broken: bool, retry_in: int) -> bool:
    """Record a failed poll of a slot; a hard failure marks the feed broken, a soft one backs
    off. False if the slot is gone."""
    cur = conn.execute(
        "UPDATE feeds SET last_status = %s, last_reason = %s, last_error = %s,"
        " consecutive_failures = consecutive_failures + 1,"
        " status = CASE WHEN %s THEN 'broken' ELSE status END,"
        " interval_reason = %s, next_poll_at = now() + make_interval(secs => %s),"
        " claimed_at = NULL, poll_started_at = NULL, last_polled_at = now()"
        " WHERE id = %s AND poll_slot = %s",
        (status, reason, detail[:1000], broken, f"backoff:{reason}", retry_in, feed_id, slot),
    )
    return cur.rowcount == 1


def log_poll(conn: psycopg.Connection, feed_id: int, *, outcome: str, http_status: int | None,
             reason: str | None, detail: str | None, conditional: bool, parsed: bool,
             entries: int, new_entries: int, body_bytes: int | None, duration_ms: int,
             next_poll_in: int | None, interval_reason: str | None, keep: int) -> None:
    """Append one poll to the feed's log and drop all but its `keep` newest rows."""
    # One statement: the insert's row is not visible to the DELETE's snapshot, so the DELETE
    # keeps keep-1 older rows beside it.
    conn.execute(
        "WITH logged AS ("
        "  INSERT INTO feed_polls (feed_id, outcome, http_status, reason, detail, conditional,"
        "   parsed, entries, new_entries, bytes, duration_ms, next_poll_in, interval_reason)"
        "  VALUES (%(id)s, %(outcome)s, %(status)s, %(reason)s, %(detail)s, %(conditional)s,"
        "   %(parsed)s, %(entries)s, %(new)s, %(bytes)s, %(ms)s, %(next)s, %(why)s))"
        " DELETE FROM feed_polls WHERE feed_id = %(id)s AND id <= ("
        "  SELECT id FROM feed_polls WHERE feed_id = %(id)s ORDER BY id DESC"
        "  OFFSET %(older)s LIMIT 1)",
        {"id": feed_id, "outcome": outcome, "status": http_status, "reason": reason,
         "detail": detail[:1000] if detail else None, "conditional": conditional,
         "parsed": parsed, "entries": entries, "new": new_entries, "bytes": body_bytes,
         "ms": duration_ms, "next": next_poll_in, "why": interval_reason,
         "older": max(0, keep - 1)},
    )


def recent_polls(conn: psycopg.Connection, feed_id: int, *, limit: int = 20) -> list[PollRow]:
    """A feed's logged polls, newest first."""
    with conn.cursor(row_factory=class_row(PollRow)) as cur:
        cur.execute(
            "SELECT id, feed_id, polled_at, outcome, http_status, reason, detail, conditional,"
            " parsed, entries, new_entries, bytes, duration_ms, next_poll_in, interval_reason"
            " FROM feed_polls WHERE feed_id = %s ORDER BY id DESC LIMIT %s",
            (feed_id, limit),
        )
        return cur.fetchall()


def summarize_feeds(conn: psycopg.Connection) -> list[FeedSummary]:
    """Every feed with its health, schedule and items per day over the last week."""
    # Items per day counts entries first seen in the window whose own date is in it too, so
    # the backlog a first poll finds does not count; a feed younger than a week is divided by
    # its age.
    with conn.cursor(row_factory=class_row(FeedSummary)) as cur:
        cur.execute(
            "SELECT f.id, f.status, f.url, f.title, f.host, f.interval_seconds,"
            " f.interval_reason, f.next_poll_at, f.last_success_at, f.consecutive_failures,"
            " f.last_reason,"
            " (SELECT count(*) FROM entries e WHERE e.feed_id = f.id"
            "   AND e.first_seen_at > now() - interval '7 days'"
            "   AND (e.published_at IS NULL OR e.published_at > now() - interval '7 days'))"
            " / GREATEST(extract(epoch FROM LEAST(interval '7 days', now() - f.created_at))"
            "   / 86400.0, 1.0 / 24)::float8 AS items_per_day"
            " FROM feeds f ORDER BY f.id"
        )
        return cur.fetchall()


def touch_seen_entries(conn: psycopg.Connection, feed_id: int, *, keys: Sequence[str],
                       urls: Sequence[str]) -> list[tuple[str, str]]:
    """Mark as seen again the feed's entries with one of these keys or links; return them."""
    # Matching on the link too means a GUID that rotates while the link stays (a CMS that
    # regenerates ids) is the entry we already have, not a new one.
    rows = conn.execute(
        "UPDATE entries SET last_seen_at = now(), times_seen = times_seen + 1"
        " WHERE feed_id = %s AND (entry_key = ANY(%s) OR url = ANY(%s))"
        " RETURNING entry_key, url",
        (feed_id, list(keys), list(urls)),
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def insert_feed_articles(conn: psycopg.Connection, *, urls: Sequence[str],
                         titles: Sequence[str | None],
                         published: Sequence[datetime | None]) -> list[int]:
    """Insert pending articles for these links (already-known links are skipped); return new ids."""
    # enqueued_at is set in the same transaction: the task is sent right after commit, and
    # the sweeper resends only if that send was lost. Callers pass links sorted, so two feeds
    # that share links take the unique-index locks in one order and never deadlock.
    rows = conn.execute(
        "INSERT INTO articles (url, origin, feed_title, feed_published_at, enqueued_at)"
        " SELECT x.url, 'feed', x.title, x.published, now()"
        " FROM unnest(%s::text[], %s::text[], %s::timestamptz[]) AS x(url, title, published)"
        " ON CONFLICT (url) DO NOTHING RETURNING id",
        (list(urls), list(titles), list(published)),
    ).fetchall()
    return [r[0] for r in rows]


def insert_entries(conn: psycopg.Connection, feed_id: int, *, keys: Sequence[str],
                   guids: Sequence[str | None], urls: Sequence[str],
                   titles: Sequence[str | None], published: Sequence[datetime | None]) -> int:
    """Record first sightings of entries in a feed, linked to their articles; return how many."""
    cur = conn.execute(
        "INSERT INTO entries (feed_id, entry_key, guid, url, title, published_at, article_id)"
        " SELECT %s, x.key, x.guid, x.url, x.title, x.published, a.id"
        " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::timestamptz[])"
        "   AS x(key, guid, url, title, published)"
        " JOIN articles a ON a.url = x.url"
        " ON CONFLICT (feed_id, entry_key) DO UPDATE SET last_seen_at = now()",
        (feed_id, list(keys), list(guids), list(urls), list(titles), list(published)),
    )
    return cur.rowcount


def record_sightings(conn: psycopg.Connection, feed_id: int,
                     entries: Iterable[FeedEntry]) -> Sightings:
    """Record one document's entries for a feed (the three statements above, in the caller's
    transaction): sightings of known ones, new entries and new articles."""
    fresh: dict[str, FeedEntry] = {}
    urls_seen: set[str] = set()
    for entry in entries:
        if not entry.url:
            continue  # nothing to fetch: an entry without a link never becomes an article
        key = entry_key(entry)
        if key in fresh or entry.url in urls_seen:
            continue  # the same item twice in one document
        fresh[key] = entry
        urls_seen.add(entry.url)
    seen = len(fresh)
    if not fresh:
        return Sightings(0, 0, [])
    known = touch_seen_entries(conn, feed_id, keys=list(fresh), urls=sorted(urls_seen))
    known_keys = {k for k, _ in known}
    known_urls = {u for _, u in known}
    new = sorted(((k, e) for k, e in fresh.items()
                  if k not in known_keys and e.url not in known_urls),
                 key=lambda pair: pair[1].url or "")
    if not new:
        return Sightings(seen, 0, [])
    urls = [e.url or "" for _, e in new]
    titles = [e.title for _, e in new]
    published = [e.published for _, e in new]
    article_ids = insert_feed_articles(conn, urls=urls, titles=titles, published=published)
    insert_entries(conn, feed_id, keys=[k for k, _ in new], guids=[e.guid for _, e in new],
                   urls=urls, titles=titles, published=published)
    return Sightings(seen, len(new), article_ids)


def record_entries(conn: psycopg.Connection, feed_id: int,
                   entries: Iterable[FeedEntry]) -> list[int]:
    """Record sightings of feed entries; return the ids of articles that are new."""
    return record_sightings(conn, feed_id, entries).new_article_ids


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
