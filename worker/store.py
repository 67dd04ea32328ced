"""All SQL in one place: one function per statement, rows returned typed.

Callers own the transaction: every function takes a connection and never commits, so the
pipeline can put several statements in one transaction and enqueue only after it commits.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import psycopg
from psycopg.rows import class_row, dict_row
from psycopg.types.json import Json, Jsonb

from worker.classify import Classification
from worker.poll import entry_key
from worker.rounds import Round, RoundLink
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
    feed_published_at: datetime | None


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


def applied_migrations(conn: psycopg.Connection) -> list[str]:
    """Versions already applied (empty on a database never migrated)."""
    exists = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()
    if not exists or exists[0] is None:
        return []
    return [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


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
        # Fixed rate: the next poll is due an interval after this one was claimed, so the
        # time spent waiting for a beat tick and polling does not stretch every interval;
        # never sooner than half an interval from now (after a long deferral, say).
        " next_poll_at = GREATEST(COALESCE(claimed_at, now()) + make_interval(secs => %(next)s),"
        "   now() + make_interval(secs => %(next)s / 2.0)),"
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
            " author, site_name, language, published_at, final_url, canonical_url, stored_at,"
            " feed_published_at"
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
            " author, site_name, language, published_at, final_url, canonical_url, stored_at,"
            " feed_published_at",
            (lease_seconds, article_id),
        )
        return cur.fetchone()


@dataclass(frozen=True)
class Identity:
    """What dedup gives a new text's article row: canonical URL, outlet and fingerprint."""

    canonical_url: str
    outlet: str | None
    fingerprint: str
    shingle_count: int


def store_article(conn: psycopg.Connection, article_id: int, page: Page, article: Article, *,
                  text_hash: str, identity: Identity | None = None) -> bool:
    """Store extracted content and mark the article stored; False if it was not pending.

    With `identity` (lineage.file_article, for a new text) the same UPDATE makes it version
    1 under that identity: one new row version of a wide, much-indexed row, not two.
    `text_hash` is dedup.content_hash(article.text), which the caller needs too."""
    row = conn.execute(
        # The hints are read once, in a CTE: as a subquery in FROM they were read three times,
        # and the statement was planned anew on every call (Postgres judged its generic plan
        # dearer), 175 µs of planning per article (pg_stat_statements, ops/bench store).
        # canonical_url is talkwire's own (set by the dedup step); the page's claim is kept apart.
        # The page wins where it says something; the feed's date, then a producer's hints (its
        # first submission that has any) only fill gaps.
        "WITH h AS MATERIALIZED (SELECT (SELECT hints FROM submissions"
        "   WHERE article_id = %(id)s AND hints <> '{}' ORDER BY id LIMIT 1) AS hints)"
        " UPDATE articles a SET state = 'stored', final_url = %(final_url)s,"
        " declared_url = %(declared)s, http_status = %(status)s, title = %(title)s,"
        " body = %(body)s, author = %(author)s,"
        " site_name = COALESCE(%(site)s, h.hints->>'source_name'),"
        " language = COALESCE(%(language)s, h.hints->>'language'),"
        " description = %(description)s, published_at = COALESCE(%(published)s,"
        "   a.feed_published_at, (h.hints->>'published_at')::timestamptz),"
        " content_hash = %(hash)s, extractor = %(extractor)s, extract_warnings = %(warnings)s,"
        " fetched_at = now(), stored_at = now(), leased_until = NULL, fail_reason = NULL,"
        " fail_detail = NULL, canonical_url = COALESCE(%(canonical)s, a.canonical_url),"
        " outlet = COALESCE(%(outlet)s, a.outlet), fingerprint = COALESCE(%(fp)s, a.fingerprint),"
        " shingle_count = COALESCE(%(shingles)s, a.shingle_count),"
        " version = CASE WHEN %(canonical)s::text IS NULL THEN a.version ELSE 1 END"
        " FROM h WHERE a.id = %(id)s AND a.state = 'pending' RETURNING a.id",
        {"final_url": page.final_url, "declared": article.canonical_url, "status": page.status,
         "title": article.title, "body": article.text, "author": article.author,
         "site": article.site_name, "language": article.language,
         "description": article.description, "published": article.published,
         "hash": text_hash, "extractor": article.extractor,
         "warnings": list(article.warnings), "id": article_id,
         "canonical": identity.canonical_url if identity else None,
         "outlet": identity.outlet if identity else None,
         "fp": identity.fingerprint if identity else None,
         "shingles": identity.shingle_count if identity else None},
    ).fetchone()
    return row is not None


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


# --- classification ---------------------------------------------------------------------


def save_classification(conn: psycopg.Connection, article_id: int, result: Classification,
                        *, fresh: bool = False) -> tuple[str | None, str | None]:
    """Replace an article's label and facts; return its previous (label, rules_version).

    `fresh`: the article was stored in this transaction, so it has no label or facts yet and
    nothing is read or deleted first."""
    previous = None if fresh else conn.execute(
        "SELECT label, rules_version FROM article_labels WHERE article_id = %s FOR UPDATE",
        (article_id,),
    ).fetchone()
    if not fresh:
        conn.execute("DELETE FROM article_facts WHERE article_id = %s", (article_id,))
    # The label and every fact in one statement (a talks story has a dozen facts or more),
    # the facts in their order. They travel as one JSON document: psycopg builds array
    # literals in Python, and the seed story's 32 facts as twelve arrays took
    # 0.34 ms of client CPU to prepare, against 0.15 ms as JSON (issue 9).
    facts = [dict(zip(_FACT_COLUMNS, row, strict=True)) for row in _fact_rows(result)]
    conn.execute(
        "WITH label AS (INSERT INTO article_labels (article_id, label, score, tracks,"
        "   rules_version, detail) VALUES (%(id)s, %(label)s, %(score)s, %(tracks)s,"
        "   %(rules)s, %(detail)s)"
        "   ON CONFLICT (article_id) DO UPDATE SET label = EXCLUDED.label,"
        "   score = EXCLUDED.score, tracks = EXCLUDED.tracks,"
        "   rules_version = EXCLUDED.rules_version, detail = EXCLUDED.detail,"
        "   classified_at = now())"
        " INSERT INTO article_facts (article_id, kind, value, role, side, track, number,"
        " relation, date_start, date_end, span_start, span_end, evidence, rules_version)"
        " SELECT %(id)s, kind, value, role, side, track, number, relation, date_start,"
        "   date_end, span_start, span_end, evidence, %(rules)s"
        " FROM ROWS FROM (json_to_recordset(%(facts)s::json) AS (kind text, value text,"
        "   role text, side text, track text, number integer, relation text,"
        "   date_start date, date_end date, span_start integer, span_end integer,"
        "   evidence text))"
        "   WITH ORDINALITY AS f(kind, value, role, side, track, number, relation,"
        "     date_start, date_end, span_start, span_end, evidence, k)"
        " ORDER BY k",
        {"id": article_id, "label": result.label, "score": result.score,
         "tracks": list(result.tracks), "rules": result.rules_version,
         "detail": Jsonb(result.to_dict()), "facts": Json(facts, dumps=_dump_facts)},
    )
    if previous is not None and previous[0] != result.label:
        conn.execute(
            "INSERT INTO label_changes (article_id, old_label, new_label, old_rules_version,"
            " new_rules_version) VALUES (%s, %s, %s, %s, %s)",
            (article_id, previous[0], result.label, previous[1], result.rules_version),
        )
    return (previous[0], previous[1]) if previous else (None, None)


_FACT_COLUMNS = ("kind", "value", "role", "side", "track", "number", "relation", "date_start",
                 "date_end", "span_start", "span_end", "evidence")


def _dump_facts(facts: object) -> str:
    return json.dumps(facts, ensure_ascii=False, default=date.isoformat)


def _fact_rows(result: Classification) -> list[tuple[object, ...]]:
    # Columns: _FACT_COLUMNS.
    rows: list[tuple[object, ...]] = []
    for hit in result.track_hits:
        e = hit.evidence
        rows.append(("track", hit.track, None, None, hit.track, None, None, None, None,
                     e.start, e.end, e.text))
    for mention in result.rounds:
        e = mention.evidence
        start, end = mention.date_range or (None, None)
        rows.append(("round", mention.name, None, None, mention.track, mention.number,
                     mention.relation, start, end, e.start, e.end, e.text))
    for found in result.dates:
        e = found.evidence
        rows.append(("date", None, None, None, None, None, None, found.start, found.end,
                     e.start, e.end, e.text))
    for venue in result.venues:
        e = venue.evidence
        rows.append(("venue", venue.name, None, None, None, None, None, None, None,
                     e.start, e.end, e.text))
    for actor in result.actors:
        e = actor.evidence
        rows.append(("actor", actor.name, actor.role, actor.side, None, None, None, None, None,
                     e.start, e.end, e.text))
    return rows


@dataclass(frozen=True)
class StoredText:
    """What reclassification needs of a stored article."""

    id: int
    title: str | None
    body: str
    language: str | None
    published_at: datetime | None


def list_stored_texts(conn: psycopg.Connection, *, since: datetime | None, after_id: int,
                      limit: int) -> list[StoredText]:
    """One page of stored articles (published or stored since a time) with id > after_id."""
    # Keyset pagination: each page is its own short query, so reprocessing a large archive
    # holds no long transaction open.
    with conn.cursor(row_factory=class_row(StoredText)) as cur:
        cur.execute(
            "SELECT id, title, body, language, published_at FROM articles"
            " WHERE state = 'stored' AND body IS NOT NULL AND id > %(after)s"
            "   AND (%(since)s::timestamptz IS NULL"
            "        OR COALESCE(published_at, stored_at) >= %(since)s::timestamptz)"
            " ORDER BY id LIMIT %(limit)s",
            {"since": since, "after": after_id, "limit": limit},
        )
        return cur.fetchall()


def count_stored_since(conn: psycopg.Connection, *, since: datetime | None) -> int:
    """How many stored articles iter_stored_texts would yield."""
    row = conn.execute(
        "SELECT count(*) FROM articles WHERE state = 'stored' AND body IS NOT NULL"
        " AND (%(since)s::timestamptz IS NULL"
        "      OR COALESCE(published_at, stored_at) >= %(since)s::timestamptz)",
        {"since": since},
    ).fetchone()
    return int(row[0]) if row else 0


# --- rounds -----------------------------------------------------------------------------


def upsert_tracks(conn: psycopg.Connection, tracks: Iterable[tuple[str, str]]) -> None:
    """Insert or rename the negotiation tracks (id, name) the knowledge files define."""
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO tracks (id, name) VALUES (%s, %s)"
            " ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name",
            list(tracks),
        )


# The registry as this process last read it: ((database, token, version), rounds).
_REGISTRY: tuple[tuple[str, str, int], tuple[Round, ...]] | None = None


def list_rounds(conn: psycopg.Connection) -> list[Round]:
    """Every round in the registry, in track and date order.

    The rounds are kept in memory with the registry's version (0009_round_registry_version):
    each call reads the version, and the rounds only when it moved. They are read after the
    version, so they are never older than it; the copy is at least as fresh as a full read
    at the start of the call, own uncommitted changes included."""
    global _REGISTRY
    row = conn.execute("SELECT token::text, version FROM round_registry").fetchone()
    assert row is not None, "round_registry has one row (migration 0009)"
    info = conn.info
    key = (f"{info.host}:{info.port}/{info.dbname}", str(row[0]), int(row[1]))
    kept = _REGISTRY  # read once: a thread of the same process may replace it meanwhile
    if kept is not None and kept[0] == key:
        return list(kept[1])
    rows = conn.execute(
        "SELECT id, track, number, name, start_date, end_date, venue, status FROM rounds"
        " ORDER BY track, start_date NULLS LAST, id"
    ).fetchall()
    rounds = tuple(Round(*r) for r in rows)
    _REGISTRY = (key, rounds)
    return list(rounds)


def get_round_source(conn: psycopg.Connection, round_id: str) -> tuple[str, dict[str, object]] | None:
    """A round's source ('seed' or 'article') and per-field provenance, or None."""
    row = conn.execute("SELECT source, provenance FROM rounds WHERE id = %s", (round_id,)).fetchone()
    return (row[0], row[1]) if row else None


def insert_round(conn: psycopg.Connection, rnd: Round, *, source: str,
                 article_id: int | None, note: str | None) -> bool:
    """Add a round unless its id exists; record the creation. True if it was added."""
    origin: dict[str, object] = {"source": source}
    if article_id is not None:
        origin["article_id"] = article_id
    provenance = {f: origin for f in ("number", "name", "start_date", "end_date", "venue", "status")}
    row = conn.execute(
        "INSERT INTO rounds (id, track, number, name, start_date, end_date, venue, status,"
        " source, source_article_id, provenance, note)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (id) DO NOTHING RETURNING id",
        (rnd.id, rnd.track, rnd.number, rnd.name, rnd.start, rnd.end, rnd.venue, rnd.status,
         source, article_id, Jsonb(provenance), note),
    ).fetchone()
    if row is None:
        return False
    change_id = conn.execute(
        "INSERT INTO round_changes (round_id, change, new_value, article_id)"
        " VALUES (%s, 'created', %s, %s) RETURNING id",
        (rnd.id, Jsonb(_round_json(rnd)), article_id),
    ).fetchone()
    # Round ids are text; the feed's entity_id is the round_changes row, payload names the round.
    append_change(conn, "round_created", "round", change_id[0],
                  {"round_id": rnd.id, "source": source, "article_id": article_id,
                   **_round_json(rnd)})
    return True


def update_round(conn: psycopg.Connection, old: Round, new: Round, *, change: str,
                 source: str, article_id: int | None) -> None:
    """Change a round's fields, noting which fields this source set, and record the change."""
    origin: dict[str, object] = {"source": source}
    if article_id is not None:
        origin["article_id"] = article_id
    old_json, new_json = _round_json(old), _round_json(new)
    changed = {k: origin for k in new_json if new_json[k] != old_json[k]}
    if not changed:
        return
    conn.execute(
        "UPDATE rounds SET number = %s, name = %s, start_date = %s, end_date = %s, venue = %s,"
        " status = %s, provenance = provenance || %s, updated_at = now() WHERE id = %s",
        (new.number, new.name, new.start, new.end, new.venue, new.status, Jsonb(changed), new.id),
    )
    old_values = {k: old_json[k] for k in changed}
    new_values = {k: new_json[k] for k in changed}
    change_id = conn.execute(
        "INSERT INTO round_changes (round_id, change, old_value, new_value, article_id)"
        " VALUES (%s, %s, %s, %s, %s) RETURNING id",
        (new.id, change, Jsonb(old_values), Jsonb(new_values), article_id),
    ).fetchone()
    append_change(conn, "round_updated", "round", change_id[0],
                  {"round_id": new.id, "change": change, "old": old_values, "new": new_values,
                   "article_id": article_id})


def _round_json(rnd: Round) -> dict[str, object]:
    return {"number": rnd.number, "name": rnd.name,
            "start_date": rnd.start.isoformat() if rnd.start else None,
            "end_date": rnd.end.isoformat() if rnd.end else None,
            "venue": rnd.venue, "status": rnd.status}


def replace_round_links(conn: psycopg.Connection, article_id: int, links: Sequence[RoundLink],
                        *, rules_version: str, fresh: bool = False) -> tuple[int, int]:
    """Make an article's round links exactly `links`; record what was added and removed
    (`fresh`: stored in this transaction, so it has no links to read first)."""
    before: set[tuple[str, str]] = set() if fresh else {(r[0], r[1]) for r in conn.execute(
        "SELECT round_id, relation FROM round_links WHERE article_id = %s FOR UPDATE",
        (article_id,))}
    after = {(link.round_id, link.relation): link for link in links}
    removed = before - after.keys()
    added = after.keys() - before
    with conn.cursor() as cur:
        cur.executemany(
            "DELETE FROM round_links WHERE article_id = %s AND round_id = %s AND relation = %s",
            [(article_id, rid, rel) for rid, rel in removed],
        )
        cur.executemany(
            "INSERT INTO round_links (article_id, round_id, relation, confidence, method,"
            " evidence, span_start, span_end, rules_version) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (article_id, round_id, relation) DO UPDATE SET"
            " confidence = EXCLUDED.confidence, method = EXCLUDED.method,"
            " evidence = EXCLUDED.evidence, span_start = EXCLUDED.span_start,"
            " span_end = EXCLUDED.span_end, rules_version = EXCLUDED.rules_version,"
            " linked_at = now()",
            [(article_id, link.round_id, link.relation, link.confidence, link.method,
              link.evidence.text, link.evidence.start, link.evidence.end, rules_version)
             for link in after.values()],
        )
        cur.executemany(
            "INSERT INTO round_link_changes (article_id, round_id, relation, change, confidence,"
            " rules_version) VALUES (%s, %s, %s, %s, %s, %s)",
            [(article_id, rid, rel, "removed", None, rules_version) for rid, rel in removed]
            + [(article_id, rid, rel, "added", after[(rid, rel)].confidence, rules_version)
               for rid, rel in added],
        )
    if added or removed:
        append_change(conn, "round_link_changed", "article", article_id,
                      {"added": [{"round_id": r, "relation": rel} for r, rel in sorted(added)],
                       "removed": [{"round_id": r, "relation": rel} for r, rel in sorted(removed)],
                       "rules_version": rules_version})
    return len(added), len(removed)


def list_articles_to_relink(conn: psycopg.Connection, *, start: date, end: date,
                            round_id: str | None) -> list[int]:
    """Talks and related articles published in a window, or already linked to a round."""
    rows = conn.execute(
        "SELECT a.id FROM articles a JOIN article_labels l ON l.article_id = a.id"
        " WHERE l.label IN ('talks', 'related') AND a.state = 'stored'"
        "   AND a.published_at >= %s AND a.published_at < %s"
        " UNION"
        " SELECT article_id FROM round_links WHERE round_id = %s"
        " ORDER BY 1",
        (start, end, round_id),
    ).fetchall()
    return [r[0] for r in rows]


def get_stored_text(conn: psycopg.Connection, article_id: int) -> StoredText | None:
    """One stored article's text for reclassification, or None."""
    with conn.cursor(row_factory=class_row(StoredText)) as cur:
        cur.execute(
            "SELECT id, title, body, language, published_at FROM articles"
            " WHERE id = %s AND state = 'stored' AND body IS NOT NULL",
            (article_id,),
        )
        return cur.fetchone()


@dataclass(frozen=True)
class RoundSummary:
    """A round with its neighbours and how many stories link to it, by relation."""

    id: str
    track: str
    number: int | None
    name: str
    start_date: date | None
    end_date: date | None
    venue: str | None
    status: str
    previous_round_id: str | None
    next_round_id: str | None
    about: int
    refers_to: int
    announces: int


def list_round_summaries(conn: psycopg.Connection, *, track: str | None) -> list[RoundSummary]:
    """Rounds in track and date order with their neighbours and link counts."""
    with conn.cursor(row_factory=class_row(RoundSummary)) as cur:
        cur.execute(
            "SELECT s.id, s.track, s.number, s.name, s.start_date, s.end_date, s.venue, s.status,"
            " s.previous_round_id, s.next_round_id,"
            " count(l.*) FILTER (WHERE l.relation = 'about') AS about,"
            " count(l.*) FILTER (WHERE l.relation = 'refers_to') AS refers_to,"
            " count(l.*) FILTER (WHERE l.relation = 'announces') AS announces"
            " FROM round_sequence s LEFT JOIN round_links l ON l.round_id = s.id"
            " WHERE %(track)s::text IS NULL OR s.track = %(track)s::text"
            " GROUP BY s.id, s.track, s.number, s.name, s.start_date, s.end_date, s.venue,"
            "   s.status, s.previous_round_id, s.next_round_id"
            " ORDER BY s.track, s.start_date NULLS LAST, s.id",
            {"track": track},
        )
        return cur.fetchall()


def get_round_summary(conn: psycopg.Connection, round_id: str) -> RoundSummary | None:
    """One round's summary, or None."""
    return next((r for r in list_round_summaries(conn, track=None) if r.id == round_id), None)


@dataclass(frozen=True)
class TimelineStory:
    """One story on a round's timeline."""

    article_id: int
    published_at: datetime | None
    relation: str
    outlet: str | None
    headline: str | None
    url: str
    evidence: str


def list_round_timeline(conn: psycopg.Connection, round_id: str) -> list[TimelineStory]:
    """A round's stories in order of publication, with relation, outlet and headline."""
    with conn.cursor(row_factory=class_row(TimelineStory)) as cur:
        cur.execute(
            "SELECT article_id, published_at, relation, outlet, headline, url, evidence"
            " FROM round_timeline WHERE round_id = %s ORDER BY published_at NULLS LAST, article_id",
            (round_id,),
        )
        return cur.fetchall()


# --- dedup: aliases, signatures, stories, versions, decisions (issue 6) ----------------


@dataclass(frozen=True)
class DedupRow:
    """An article as the dedup step sees it: identity, latest text and story."""

    id: int
    state: str
    url: str
    canonical_url: str | None
    final_url: str | None
    title: str | None
    body: str | None
    content_hash: str | None
    fingerprint: str | None
    shingle_count: int | None
    version: int
    story_id: int | None
    published_at: datetime | None


@dataclass(frozen=True)
class CandidateRow:
    """A stored article that may be a copy of a new one: its text and its story.

    `body` is None when an earlier candidate in the same answer has the same fingerprint,
    hence the same words to compare."""

    id: int
    title: str | None
    body: str | None
    story_id: int | None
    shingle_count: int | None
    fingerprint: str | None


@dataclass(frozen=True)
class StoryRefresh:
    """A story's representative before and after a membership change, and its size."""

    story_id: int
    old_representative_id: int
    representative_id: int
    member_count: int


def lock_dedup_keys(conn: psycopg.Connection, keys: Sequence[int]) -> None:
    """Take transaction advisory locks on the keys (URL, fingerprint, bands) in sorted order."""
    # Two copies of one story processed at once share at least one key, so the second waits
    # for the first to commit and then sees it; sorted order rules out lock-order deadlocks.
    conn.execute(
        "SELECT pg_advisory_xact_lock(k)"
        " FROM (SELECT DISTINCT k FROM unnest(%s::bigint[]) AS k ORDER BY k) AS sorted_keys",
        (list(keys),),
    )


def find_article_by_url(conn: psycopg.Connection, url: str) -> int | None:
    """The article that owns this URL as an alias (any variant, or its canonical form)."""
    row = conn.execute("SELECT article_id FROM article_aliases WHERE url = %s", (url,)).fetchone()
    return None if row is None else int(row[0])


# Statements that file_first_version also runs, as parts of its own: named parameters
# %(id)s with %(urls)s and %(kinds)s; %(version)s, %(shingles)s, %(bands)s and %(method)s;
# %(indexed)s.
_INSERT_ALIASES = (
    "INSERT INTO article_aliases (url, article_id, kind)"
    " SELECT u, %(id)s, k FROM unnest(%(urls)s::text[], %(kinds)s::text[]) AS a(u, k)"
    " ON CONFLICT (url) DO NOTHING")
_UPSERT_SIGNATURE = (
    "INSERT INTO article_signatures (article_id, version, shingle_count, band_keys, method)"
    " VALUES (%(id)s, %(version)s, %(shingles)s, %(bands)s, %(method)s)"
    " ON CONFLICT (article_id) DO UPDATE SET version = EXCLUDED.version,"
    " shingle_count = EXCLUDED.shingle_count, band_keys = EXCLUDED.band_keys,"
    " method = EXCLUDED.method, signed_at = now()")
_INSERT_BANDS = (
    "INSERT INTO article_bands (band_key, article_id)"
    " SELECT k, %(id)s FROM unnest(%(indexed)s::bigint[]) AS k ON CONFLICT DO NOTHING")


def add_aliases(conn: psycopg.Connection, article_id: int,
                aliases: Iterable[tuple[str, str]]) -> None:
    """Record (url, kind) aliases of an article; a URL already owned keeps its owner."""
    urls = dict(aliases)
    conn.execute(_INSERT_ALIASES,
                 {"id": article_id, "urls": list(urls), "kinds": list(urls.values())})


def get_dedup_row(conn: psycopg.Connection, article_id: int) -> DedupRow | None:
    """One article's identity, latest text and story, or None."""
    with conn.cursor(row_factory=class_row(DedupRow)) as cur:
        cur.execute(
            "SELECT id, state, url, canonical_url, final_url, title, body, content_hash,"
            " fingerprint, shingle_count, version, story_id, published_at"
            " FROM articles WHERE id = %s",
            (article_id,),
        )
        return cur.fetchone()


def file_first_version(conn: psycopg.Connection, article_id: int, *,
                       aliases: Iterable[tuple[str, str]], title: str | None, body: str,
                       content_hash: str, fingerprint: str, final_url: str | None,
                       shingle_count: int, band_keys: Sequence[int], method: str,
                       indexed: bool, joining_story_id: int | None) -> None:
    """Give a new text, stored with its identity (store_article), its aliases, version 1,
    its signature, and its band rows if it is `indexed`.

    One statement for all of them, where one each cost a round of executor and protocol
    work per article (ops/bench store). With `joining_story_id` it also locks the
    story that the article is about to join, as lock_story does: join_story, the next
    statement, then reads that story after any concurrent filing into it has committed."""
    urls = dict(aliases)
    conn.execute(
        f"WITH aliases AS ({_INSERT_ALIASES}),"
        " version AS (INSERT INTO article_versions (article_id, version, title, body,"
        "   content_hash, fingerprint, final_url, fetched_by, material)"
        "   VALUES (%(id)s, 1, %(title)s, %(body)s, %(hash)s, %(fp)s, %(final)s, %(id)s, true)"
        "   ON CONFLICT DO NOTHING),"
        f" signature AS ({_UPSERT_SIGNATURE}),"
        f" indexed AS ({_INSERT_BANDS}),"
        # A CTE that only reads runs when the query refers to it, hence the count.
        " joining AS (SELECT 1 FROM stories WHERE id = %(story)s FOR UPDATE)"
        " SELECT count(*) FROM joining",
        {"id": article_id, "urls": list(urls), "kinds": list(urls.values()), "title": title,
         "body": body, "hash": content_hash, "fp": fingerprint, "final": final_url,
         "version": 1, "shingles": shingle_count, "bands": list(band_keys), "method": method,
         "indexed": list(band_keys) if indexed else [], "story": joining_story_id},
    )


def mark_duplicate(conn: psycopg.Connection, article_id: int, owner_id: int) -> bool:
    """Turn an article row into a tombstone pointing at the article its URL names."""
    # The text lives on in the owner's versions; the row stays so its URL is not fetched again.
    cur = conn.execute(
        "UPDATE articles SET state = 'duplicate', duplicate_of = %s,"
        " latest_id = (SELECT COALESCE(o.latest_id, o.id) FROM articles o WHERE o.id = %s),"
        " body = NULL, leased_until = NULL, fail_reason = NULL, fail_detail = NULL,"
        " stored_at = COALESCE(stored_at, now())"
        " WHERE id = %s AND state IN ('pending', 'stored')",
        (owner_id, owner_id, article_id),
    )
    return cur.rowcount == 1


def move_entries(conn: psycopg.Connection, from_article_id: int, to_article_id: int) -> int:
    """Re-point feed sightings of one article to another; return how many moved."""
    cur = conn.execute("UPDATE entries SET article_id = %s WHERE article_id = %s",
                       (to_article_id, from_article_id))
    return cur.rowcount


def find_exact_copies(conn: psycopg.Connection, fingerprint: str, *, exclude_id: int,
                      limit: int) -> list[tuple[int, int]]:
    """(article id, story id) of filed articles whose normalized text has this fingerprint,
    oldest first."""
    rows = conn.execute(
        "SELECT id, story_id FROM articles WHERE fingerprint = %s AND state = 'stored'"
        " AND story_id IS NOT NULL AND id <> %s ORDER BY id LIMIT %s",
        (fingerprint, exclude_id, limit),
    ).fetchall()
    return [(int(r[0]), int(r[1])) for r in rows]


def find_band_candidates(conn: psycopg.Connection, band_keys: Sequence[int], *,
                         exclude_id: int, limit: int) -> list[tuple[int, int]]:
    """Articles sharing LSH bands with a signature, as (article_id, shared bands), most first."""
    # One probe of the (band_key, article_id) primary key per band: index-only, independent
    # of how many signatures are stored.
    rows = conn.execute(
        "SELECT article_id, count(*) FROM article_bands"
        " WHERE band_key = ANY(%s::bigint[]) AND article_id <> %s"
        " GROUP BY article_id ORDER BY count(*) DESC, article_id LIMIT %s",
        (list(band_keys), exclude_id, limit),
    ).fetchall()
    return [(int(r[0]), int(r[1])) for r in rows]


def get_candidate_texts(conn: psycopg.Connection, article_ids: Sequence[int]) -> list[CandidateRow]:
    """The latest text and story of stored articles, in id order; each text only once.

    A wire story copied word for word by many outlets fills the band lookup with its copies,
    and their texts are one text: only the first copy of each fingerprint brings its body
    (the others' is None), so it is read, sent and compared once."""
    with conn.cursor(row_factory=class_row(CandidateRow)) as cur:
        cur.execute(
            "SELECT id, title,"
            " CASE WHEN row_number() OVER (PARTITION BY COALESCE(fingerprint, id::text)"
            "   ORDER BY id) = 1 THEN body END AS body,"
            " story_id, shingle_count, fingerprint FROM articles"
            " WHERE id = ANY(%s::bigint[]) AND state = 'stored' AND body IS NOT NULL ORDER BY id",
            (list(article_ids),),
        )
        return cur.fetchall()


def delete_bands(conn: psycopg.Connection, article_id: int) -> None:
    """Remove an article's LSH band rows (before its signature is replaced)."""
    conn.execute(
        "DELETE FROM article_bands b USING article_signatures s"
        " WHERE s.article_id = %s AND b.band_key = ANY(s.band_keys) AND b.article_id = s.article_id",
        (article_id,),
    )


def upsert_signature(conn: psycopg.Connection, article_id: int, *, version: int,
                     shingle_count: int, band_keys: Sequence[int], method: str) -> None:
    """Store (or replace) the signature of an article's latest text."""
    conn.execute(_UPSERT_SIGNATURE, {"id": article_id, "version": version,
                                     "shingles": shingle_count, "bands": list(band_keys),
                                     "method": method})


def insert_bands(conn: psycopg.Connection, article_id: int, band_keys: Sequence[int]) -> None:
    """Index an article under each of its LSH band keys."""
    conn.execute(_INSERT_BANDS, {"id": article_id, "indexed": list(band_keys)})


def index_first_copy(conn: psycopg.Connection, fingerprint: str, *, exclude_id: int) -> None:
    """Give the oldest stored article with this fingerprint (other than exclude_id) the band
    rows of its signature, unless it has them."""
    conn.execute(
        "INSERT INTO article_bands (band_key, article_id)"
        " SELECT unnest(s.band_keys), s.article_id FROM article_signatures s"
        " WHERE s.article_id = (SELECT min(id) FROM articles WHERE fingerprint = %s"
        "   AND state = 'stored' AND id <> %s)"
        " ON CONFLICT DO NOTHING",
        (fingerprint, exclude_id),
    )


def insert_version(conn: psycopg.Connection, article_id: int, version: int, *,
                   title: str | None, body: str, content_hash: str, fingerprint: str,
                   final_url: str | None, fetched_by: int, diff_summary: str | None,
                   diff: dict[str, object] | None, material: bool) -> bool:
    """Record one version of an article's text; False if that version number exists."""
    cur = conn.execute(
        "INSERT INTO article_versions (article_id, version, title, body, content_hash,"
        " fingerprint, final_url, fetched_by, diff_summary, diff, material)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
        (article_id, version, title, body, content_hash, fingerprint, final_url, fetched_by,
         diff_summary, Jsonb(diff) if diff is not None else None, material),
    )
    return cur.rowcount == 1


def update_article_text(conn: psycopg.Connection, article_id: int, *, version: int,
                        title: str | None, body: str, content_hash: str, fingerprint: str,
                        shingle_count: int, final_url: str | None) -> None:
    """Make a new version the article's current text (labels and links read this row)."""
    conn.execute(
        "UPDATE articles SET version = %s, title = COALESCE(%s, title), body = %s,"
        " content_hash = %s, fingerprint = %s, shingle_count = %s,"
        " final_url = COALESCE(%s, final_url), fetched_at = now() WHERE id = %s",
        (version, title, body, content_hash, fingerprint, shingle_count, final_url, article_id),
    )


def link_update(conn: psycopg.Connection, article_id: int, earlier_id: int) -> None:
    """Record that an article updates an earlier one, and make it the newest of that chain."""
    conn.execute("UPDATE articles SET update_of = %s WHERE id = %s", (earlier_id, article_id))
    # Everything that followed the earlier article (or what it already led to) now follows
    # the new one: that is where labels and round links should be read.
    conn.execute(
        "WITH chain AS (SELECT COALESCE(latest_id, id) AS head FROM articles WHERE id = %(e)s)"
        " UPDATE articles SET latest_id = %(n)s"
        " WHERE id <> %(n)s AND (id = %(e)s OR latest_id = %(e)s"
        "   OR id = (SELECT head FROM chain) OR latest_id = (SELECT head FROM chain))",
        {"e": earlier_id, "n": article_id},
    )


def create_story(conn: psycopg.Connection, representative_id: int) -> int:
    """Open a story with one article as its representative and only member; return its id."""
    row = conn.execute(
        "WITH story AS (INSERT INTO stories (representative_id) VALUES (%(a)s) RETURNING id),"
        " filed AS (UPDATE articles SET story_id = (SELECT id FROM story) WHERE id = %(a)s)"
        " SELECT id FROM story",
        {"a": representative_id}).fetchone()
    assert row is not None
    return int(row[0])


def set_article_story(conn: psycopg.Connection, article_id: int, story_id: int) -> None:
    """File one article under a story."""
    conn.execute("UPDATE articles SET story_id = %s WHERE id = %s", (story_id, article_id))


def merge_story(conn: psycopg.Connection, story_id: int, into_story_id: int) -> int:
    """Move every member of a story into another and mark it merged; return members moved."""
    # Counted from RETURNING rather than rowcount, which psycopg's pipeline mode leaves unset.
    row = conn.execute("WITH moved AS (UPDATE articles SET story_id = %s WHERE story_id = %s"
                       " RETURNING 1) SELECT count(*) FROM moved",
                       (into_story_id, story_id)).fetchone()
    conn.execute("UPDATE stories SET merged_into = %s, member_count = 0, updated_at = now()"
                 " WHERE id = %s", (into_story_id, story_id))
    # Stories merged into this one earlier now point at the survivor too.
    conn.execute("UPDATE stories SET merged_into = %s WHERE merged_into = %s",
                 (into_story_id, story_id))
    return int(row[0]) if row else 0


def count_story_members(conn: psycopg.Connection, story_id: int) -> int:
    """How many stored articles a story holds."""
    row = conn.execute("SELECT count(*) FROM articles WHERE story_id = %s AND state = 'stored'",
                       (story_id,)).fetchone()
    return int(row[0]) if row else 0


def lock_story(conn: psycopg.Connection, story_id: int) -> None:
    """Hold a story's row until commit, so the next statement reads its members after any
    concurrent filing into it has committed (a statement's snapshot is taken when it starts,
    and one that waits on the row would count without the other's member)."""
    conn.execute("SELECT 1 FROM stories WHERE id = %s FOR UPDATE", (story_id,))


def refresh_story(conn: psycopg.Connection, story_id: int) -> StoryRefresh | None:
    """Recount a story and re-pick its representative: the most complete text, then earliest.

    Reads every member: for a story whose membership only grew by one, add_story_member
    does the same in constant time."""
    lock_story(conn, story_id)
    row = conn.execute(
        "WITH best AS ("
        "  SELECT id, count(*) OVER () AS n FROM articles"
        "  WHERE story_id = %(s)s AND state = 'stored'"
        "  ORDER BY shingle_count DESC NULLS LAST, published_at NULLS LAST, id LIMIT 1),"
        " old AS (SELECT representative_id FROM stories WHERE id = %(s)s)"
        " UPDATE stories s SET representative_id = best.id, member_count = best.n,"
        "   updated_at = now()"
        " FROM best, old WHERE s.id = %(s)s"
        " RETURNING s.id, old.representative_id, s.representative_id, s.member_count",
        {"s": story_id},
    ).fetchone()
    return None if row is None else StoryRefresh(int(row[0]), int(row[1]), int(row[2]), int(row[3]))


def join_story(conn: psycopg.Connection, story_id: int, article_id: int, *,
               matched_article_id: int, detail: dict[str, object]) -> StoryRefresh | None:
    """File a new article under a story it copies (its only story): set its story, note the
    change (member_added), count it in, and make it the representative if it beats the
    current one by refresh_story's order. One statement, reading two articles rather than
    every member: a wire story copied by hundreds of outlets would otherwise re-read all of
    them for each copy (ops/bench pipeline).

    The caller holds the story's row already (file_first_version's `joining_story_id`), so
    this statement's snapshot, taken after that lock, sees every earlier member."""
    row = conn.execute(
        "WITH old AS (SELECT representative_id FROM stories WHERE id = %(s)s),"
        " filed AS (UPDATE articles SET story_id = %(s)s WHERE id = %(a)s),"
        " noted AS (INSERT INTO story_changes (kind, story_id, article_id, other_article_id,"
        "   detail) VALUES ('member_added', %(s)s, %(a)s, %(m)s, %(d)s)),"
        # Two primary-key probes, whatever the table's statistics say: with none yet, the
        # planner took state = 'stored' for a rare value and scanned every stored article
        # by its partial index (ops/bench store), so the state is checked after the fence.
        " pair AS MATERIALIZED (SELECT id, state, shingle_count, published_at FROM articles"
        "  WHERE id = ANY(ARRAY[(SELECT representative_id FROM old), %(a)s]::bigint[])),"
        " best AS (SELECT id FROM pair WHERE state = 'stored'"
        "  ORDER BY shingle_count DESC NULLS LAST, published_at NULLS LAST, id LIMIT 1)"
        " UPDATE stories s SET representative_id = best.id, member_count = s.member_count + 1,"
        "   updated_at = now()"
        " FROM best, old WHERE s.id = %(s)s"
        " RETURNING s.id, old.representative_id, s.representative_id, s.member_count",
        {"s": story_id, "a": article_id, "m": matched_article_id, "d": Jsonb(detail)},
    ).fetchone()
    _follow_story_change(conn, "member_added", story_id=story_id, article_id=article_id,
                         other_story_id=None, detail=detail)
    return None if row is None else StoryRefresh(int(row[0]), int(row[1]), int(row[2]), int(row[3]))


def record_decision(conn: psycopg.Connection, article_id: int, *, version: int, method: str,
                    score: float, matched_article_id: int | None, story_id: int | None,
                    evidence: dict[str, object], rules_version: str) -> None:
    """Record how and why one article (version) was filed."""
    conn.execute(
        "INSERT INTO dedup_decisions (article_id, version, method, score, matched_article_id,"
        " story_id, evidence, rules_version) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (article_id, version, method, score, matched_article_id, story_id, Jsonb(evidence),
         rules_version),
    )


def record_story_change(conn: psycopg.Connection, kind: str, *, story_id: int | None,
                        article_id: int | None = None, other_story_id: int | None = None,
                        other_article_id: int | None = None,
                        detail: dict[str, object] | None = None) -> None:
    """Append one change to the story graph; the ones consumers follow go to the change feed."""
    conn.execute(
        "INSERT INTO story_changes (kind, story_id, article_id, other_story_id,"
        " other_article_id, detail) VALUES (%s, %s, %s, %s, %s, %s)",
        (kind, story_id, article_id, other_story_id, other_article_id, Jsonb(detail or {})),
    )
    _follow_story_change(conn, kind, story_id=story_id, article_id=article_id,
                         other_story_id=other_story_id, detail=detail)


def _follow_story_change(conn: psycopg.Connection, kind: str, *, story_id: int | None,
                         article_id: int | None, other_story_id: int | None,
                         detail: dict[str, object] | None) -> None:
    """Put a story change that consumers follow on the change feed."""
    if kind in {"story_merged", "member_added"} and story_id is not None:
        # For a consumer both mean "this story absorbed more": a copy joined it
        # (member_added) or another story was folded into it (story_merged).
        append_change(conn, "story_merged", "story", story_id,
                      {"kind": kind, "article_id": article_id, "merged_story_id": other_story_id})
    elif kind in {"article_version", "article_updated"} and article_id is not None:
        append_change(conn, "article_updated", "article", article_id,
                      {"story_id": story_id, "kind": kind, "detail": detail or {}})


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


# Changes held back by changes_last, per connection (see there).
_HELD_CHANGES: weakref.WeakKeyDictionary[psycopg.Connection, list[tuple[str, str, int, Jsonb]]] \
    = weakref.WeakKeyDictionary()


def append_change(conn: psycopg.Connection, event: str, entity: str, entity_id: int,
                  payload: dict[str, object]) -> int | None:
    """Append a change in the caller's transaction; NOTIFY on commit. Call it last: it locks.

    Returns the change's id; inside changes_last(conn) the change is held, written when the
    block ends, and None is returned."""
    held = _HELD_CHANGES.get(conn)
    if held is not None:
        held.append((event, entity, entity_id, Jsonb(payload)))
        return None
    # The table's trigger takes the id under a transaction-level advisory lock, so ids become
    # visible in increasing order (see 0005_contracts.sql); that lock is held until commit.
    row = conn.execute(
        "INSERT INTO changes (event, entity, entity_id, payload) VALUES (%s, %s, %s, %s)"
        " RETURNING id",
        (event, entity, entity_id, Jsonb(payload)),
    ).fetchone()
    assert row is not None
    return int(row[0])


@contextmanager
def changes_last(conn: psycopg.Connection) -> Iterator[None]:
    """Hold the changes appended in the block and write them, in order, when it ends.

    The change feed's lock is then taken at the end of the caller's work and held only until
    its commit, however deep in that work a change arose (a copy joining a story, a round
    link), and a block's changes cost one statement. A block that raises writes nothing."""
    if conn in _HELD_CHANGES:
        yield  # an outer block writes them
        return
    held: list[tuple[str, str, int, Jsonb]] = []
    _HELD_CHANGES[conn] = held
    try:
        yield
    finally:
        del _HELD_CHANGES[conn]
    if held:
        # One statement; rows are inserted, and so numbered, in the order they were appended.
        conn.execute(
            "INSERT INTO changes (event, entity, entity_id, payload)"
            " SELECT e, n, i, p FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::jsonb[])"
            "   WITH ORDINALITY AS c(e, n, i, p, k) ORDER BY k",
            [[r[k] for r in held] for k in range(4)],
        )


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


# --- observability (issue 9): gauges read on scrape, and `talkwire status` ----------------


@dataclass(frozen=True)
class MetricState:
    """What the metrics endpoint reads from Postgres at each scrape."""

    feeds_by_status: dict[str, int]
    feeds_failing: int
    articles_by_state: dict[str, int]
    last_stored_at: datetime | None
    oldest_pending_seconds: float
    dead_letters_open: int
    rounds_in_session: int


def read_metric_state(conn: psycopg.Connection) -> MetricState:
    """Feeds by status, pending/failed counts, last store, queue age, open dead letters, rounds now."""
    # Each count uses a partial index (feeds_due_idx, articles_pending_idx,
    # articles_failed_reason_idx, articles_stored_at_idx), so a scrape stays cheap at 10M rows;
    # the stored total is not counted here for that reason (it would be a full scan).
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT"
            " (SELECT count(*) FROM feeds WHERE status = 'active') AS active,"
            " (SELECT count(*) FROM feeds WHERE status = 'broken') AS broken,"
            " (SELECT count(*) FROM feeds WHERE status = 'paused') AS paused,"
            " (SELECT count(*) FROM feeds WHERE status = 'active' AND consecutive_failures > 0)"
            "   AS failing,"
            " (SELECT count(*) FROM articles WHERE state = 'pending') AS pending,"
            " (SELECT count(*) FROM articles WHERE state = 'failed') AS failed,"
            " (SELECT max(stored_at) FROM articles WHERE state = 'stored') AS last_stored,"
            " (SELECT COALESCE(extract(epoch FROM now() - min(enqueued_at)), 0)"
            "    FROM articles WHERE state = 'pending') AS oldest_pending,"
            " (SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL) AS dead_letters,"
            " (SELECT count(*) FROM rounds WHERE status IN ('announced', 'held')"
            "    AND start_date <= current_date"
            "    AND COALESCE(end_date, start_date) >= current_date) AS rounds_in_session"
        )
        row = cur.fetchone()
    assert row is not None
    return MetricState(
        feeds_by_status={"active": row["active"], "broken": row["broken"],
                         "paused": row["paused"]},
        feeds_failing=row["failing"],
        articles_by_state={"pending": row["pending"], "failed": row["failed"]},
        last_stored_at=row["last_stored"],
        oldest_pending_seconds=float(row["oldest_pending"]),
        dead_letters_open=row["dead_letters"],
        rounds_in_session=row["rounds_in_session"],
    )


@dataclass(frozen=True)
class FeedHealth:
    """Feeds of one status: how many, how many failing, when last polled and next due."""

    status: str
    feeds: int
    failing: int
    last_polled_at: datetime | None
    last_success_at: datetime | None
    next_poll_at: datetime | None


def summarize_feed_health(conn: psycopg.Connection) -> list[FeedHealth]:
    """One row per feed status with failure count and last/next poll times."""
    with conn.cursor(row_factory=class_row(FeedHealth)) as cur:
        cur.execute(
            "SELECT status, count(*) AS feeds,"
            " count(*) FILTER (WHERE consecutive_failures > 0) AS failing,"
            " max(last_polled_at) AS last_polled_at, max(last_success_at) AS last_success_at,"
            " min(next_poll_at) AS next_poll_at"
            " FROM feeds GROUP BY status ORDER BY status"
        )
        return cur.fetchall()


@dataclass(frozen=True)
class IngestTimes:
    """When articles were last stored, and how many in the last hour and day."""

    last_stored_at: datetime | None
    stored_last_hour: int
    stored_last_day: int
    pending: int


def read_ingest_times(conn: psycopg.Connection) -> IngestTimes:
    """Last ingest time and recent stored counts (articles_stored_at_idx range scans)."""
    with conn.cursor(row_factory=class_row(IngestTimes)) as cur:
        cur.execute(
            "SELECT"
            " (SELECT max(stored_at) FROM articles WHERE state = 'stored') AS last_stored_at,"
            " (SELECT count(*) FROM articles WHERE state = 'stored'"
            "    AND stored_at >= now() - interval '1 hour') AS stored_last_hour,"
            " (SELECT count(*) FROM articles WHERE state = 'stored'"
            "    AND stored_at >= now() - interval '1 day') AS stored_last_day,"
            " (SELECT count(*) FROM articles WHERE state = 'pending') AS pending"
        )
        row = cur.fetchone()
    assert row is not None
    return row


@dataclass(frozen=True)
class FailureCount:
    """Recent failures of one kind (article, feed, dead letter) and reason."""

    kind: str
    reason: str
    count: int
    last_at: datetime | None


def count_recent_failures(conn: psycopg.Connection, since: datetime) -> list[FailureCount]:
    """Article, feed and dead-letter failures since a time, by reason, most frequent first."""
    with conn.cursor(row_factory=class_row(FailureCount)) as cur:
        cur.execute(
            "SELECT 'article' AS kind, fail_reason AS reason, count(*) AS count,"
            "   max(discovered_at) AS last_at"
            " FROM articles WHERE state = 'failed' AND discovered_at >= %(s)s"
            " GROUP BY fail_reason"
            " UNION ALL"
            " SELECT 'feed', last_reason, count(*), max(last_polled_at) FROM feeds"
            " WHERE last_reason IS NOT NULL AND last_polled_at >= %(s)s GROUP BY last_reason"
            " UNION ALL"
            " SELECT 'dead_letter', reason, count(*), max(received_at) FROM dead_letters"
            " WHERE received_at >= %(s)s GROUP BY reason"
            " ORDER BY count DESC, kind, reason",
            {"s": since},
        )
        return cur.fetchall()


def count_labels(conn: psycopg.Connection) -> list[tuple[str, int, int]]:
    """(label, all time, last 24 h) for every label given so far."""
    rows = conn.execute(
        "SELECT label, count(*),"
        " count(*) FILTER (WHERE classified_at >= now() - interval '1 day')"
        " FROM article_labels GROUP BY label ORDER BY count(*) DESC"
    ).fetchall()
    return [(str(r[0]), int(r[1]), int(r[2])) for r in rows]
