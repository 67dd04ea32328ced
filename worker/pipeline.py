"""Runs the stages for one item: fetch, parse or extract, store. Knows nothing of Celery.

Each function reads the current state from the database, does its work, commits, and
returns a typed outcome. The caller (a task, the CLI) decides what to enqueue next, and
does so only after the commit.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

import httpx
from psycopg_pool import ConnectionPool

from worker import dedup, lineage, store
from worker.config import Settings
from worker.errors import Permanent, Transient
from worker.extract import extract_article
from worker.fetch import fetch_url, make_client
from worker.logs import log_outcome
from worker.poll import failure_backoff, next_poll_interval, parse_feed
from worker.types import FetchLimits

_LOG = logging.getLogger("talkwire.pipeline")

# A feed in one of these states cannot get better by waiting (issue: hard errors).
BROKEN_FEED_REASONS = frozenset({"http_410", "not_a_feed", "blocked_address", "blocked_scheme"})
FEED_ACCEPT = ("application/rss+xml, application/atom+xml, application/feed+json, "
               "application/xml;q=0.9, text/xml;q=0.9, */*;q=0.5")


@dataclass
class Context:
    """What the stages need from the process: settings, a DB pool, one HTTP client."""

    settings: Settings
    pool: ConnectionPool
    http: httpx.Client
    limits: FetchLimits

    def close(self) -> None:
        """Release the pool and the HTTP client."""
        self.http.close()
        self.pool.close()


def open_context(settings: Settings) -> Context:
    """Open the pool and HTTP client one process uses for all its items."""
    assert settings.database_url, "resolve the embedded servers before opening a context"
    limits = settings.fetch_limits()
    if limits.allow_networks:
        _LOG.warning("fetch allow-list is on", extra={"allow_networks": settings.fetch_allow_networks})
    pool = ConnectionPool(settings.database_url, min_size=settings.db_pool_min,
                          max_size=settings.db_pool_max, open=True, name="talkwire")
    return Context(settings=settings, pool=pool, http=make_client(limits), limits=limits)


@dataclass(frozen=True)
class PollOutcome:
    """What one poll of one feed did."""

    feed_id: int
    outcome: str  # polled | not_modified | unchanged | failed | stale
    entries: int = 0
    new_article_ids: tuple[int, ...] = field(default=())
    reason: str | None = None


@dataclass(frozen=True)
class ProcessOutcome:
    """What processing one article did."""

    article_id: int
    outcome: str  # stored | duplicate | failed | retry | stale
    reason: str | None = None
    retry_after: float | None = None
    filed: lineage.Filed | None = None


def poll_feed(ctx: Context, feed_id: int) -> PollOutcome:
    """Fetch one feed, record its new entries and its health; return the new article ids."""
    started = time.monotonic()
    s = ctx.settings
    with ctx.pool.connection() as conn:
        feed = store.get_feed(conn, feed_id)
    if feed is None or feed.status != "active":
        log_outcome("poll", "stale", feed_id=feed_id, started=started)
        return PollOutcome(feed_id, "stale")
    try:
        page = fetch_url(feed.url, ctx.limits, etag=feed.etag, last_modified=feed.last_modified,
                         client=ctx.http, accept=FEED_ACCEPT)
        parsed = None
        if not page.not_modified:
            body_hash = hashlib.sha256(page.body).hexdigest()
            if body_hash != feed.body_hash:
                parsed = parse_feed(page.body, base_url=page.final_url,
                                    content_type=page.content_type)
    except (Permanent, Transient) as exc:
        status = None
        retry_after = exc.retry_after if isinstance(exc, Transient) else None
        broken = exc.reason in BROKEN_FEED_REASONS
        delay = failure_backoff(failures=feed.consecutive_failures, base=s.poll_backoff_base,
                                cap=s.poll_backoff_cap, retry_after=retry_after)
        with ctx.pool.connection() as conn:
            store.record_poll_failure(conn, feed_id, reason=exc.reason, detail=str(exc),
                                      status=status, broken=broken, retry_in=delay)
        log_outcome("poll", "failed", feed_id=feed_id, url=feed.url, reason=exc.reason,
                    started=started)
        return PollOutcome(feed_id, "failed", reason=exc.reason)

    if parsed is None:
        # 304, or a 200 whose bytes match the last body: nothing to parse or store.
        outcome = "not_modified" if page.not_modified else "unchanged"
        interval, why = next_poll_interval(current=feed.interval_seconds, feed=None,
                                           new_entries=0, total_entries=1,
                                           minimum=s.poll_interval_min, maximum=s.poll_interval_max)
        with ctx.pool.connection() as conn:
            store.record_poll_success(conn, feed_id, status=page.status, etag=page.etag,
                                      last_modified=page.last_modified, body_hash=None,
                                      title=None, interval_seconds=interval,
                                      interval_reason=why, moved_to=page.moved_to)
        log_outcome("poll", outcome, feed_id=feed_id, url=feed.url, started=started)
        return PollOutcome(feed_id, outcome)

    with ctx.pool.connection() as conn, conn.transaction():
        new_ids = store.record_entries(conn, feed_id, parsed.entries)
        interval, why = next_poll_interval(current=feed.interval_seconds, feed=parsed,
                                           new_entries=len(new_ids),
                                           total_entries=len(parsed.entries),
                                           minimum=s.poll_interval_min, maximum=s.poll_interval_max)
        store.record_poll_success(conn, feed_id, status=page.status, etag=page.etag,
                                  last_modified=page.last_modified,
                                  body_hash=hashlib.sha256(page.body).hexdigest(),
                                  title=parsed.title, interval_seconds=interval,
                                  interval_reason=why, moved_to=page.moved_to)
    log_outcome("poll", "polled", feed_id=feed_id, url=feed.url, entries=len(parsed.entries),
                new=len(new_ids), started=started)
    return PollOutcome(feed_id, "polled", entries=len(parsed.entries), new_article_ids=tuple(new_ids))


def process_article(ctx: Context, article_id: int, *, final_attempt: bool = False) -> ProcessOutcome:
    """Fetch, extract and store one pending article; a transient failure asks for a retry."""
    started = time.monotonic()
    with ctx.pool.connection() as conn:
        row = store.lease_article(conn, article_id, lease_seconds=ctx.settings.lease_seconds)
    if row is None:
        # Already stored or failed, or another worker holds the lease: nothing to do.
        log_outcome("process", "stale", article_id=article_id, started=started)
        return ProcessOutcome(article_id, "stale")
    # Google News redirect links are unwrapped offline (issue 6); a URL that is already an
    # alias of a stored article needs no fetch at all.
    urls = dedup.url_variants(row.url)
    target = dedup.unwrap_redirect_url(row.url)
    with ctx.pool.connection() as conn:
        owner_id = store.find_article_by_url(conn, dedup.canonicalize_url(target))
    if owner_id is not None and owner_id != article_id:
        with ctx.pool.connection() as conn, conn.transaction():
            filed = lineage.file_known_url(conn, article_id, owner_id, urls)
        log_outcome("process", "duplicate", article_id=article_id, url=row.url,
                    duplicate_of=owner_id, method="alias", started=started)
        return ProcessOutcome(article_id, "duplicate", filed=filed)
    try:
        page = fetch_url(target, ctx.limits, client=ctx.http,
                         accept="text/html,application/xhtml+xml;q=0.9,*/*;q=0.5")
        article = extract_article(page)
        signature = dedup.sign_text(article.text, article.title)
    except Transient as exc:
        with ctx.pool.connection() as conn:
            if final_attempt:
                store.fail_article(conn, article_id, reason=exc.reason,
                                   detail=f"gave up after retries: {exc}")
            else:
                store.release_article(conn, article_id, reason=exc.reason, detail=str(exc))
        outcome = "failed" if final_attempt else "retry"
        log_outcome("process", outcome, article_id=article_id, url=row.url, reason=exc.reason,
                    started=started)
        return ProcessOutcome(article_id, outcome, reason=exc.reason, retry_after=exc.retry_after)
    except Permanent as exc:
        with ctx.pool.connection() as conn:
            store.fail_article(conn, article_id, reason=exc.reason, detail=str(exc))
        log_outcome("process", "failed", article_id=article_id, url=row.url, reason=exc.reason,
                    started=started)
        return ProcessOutcome(article_id, "failed", reason=exc.reason)
    filed = None
    with ctx.pool.connection() as conn, conn.transaction():
        stored = store.store_article(conn, article_id, page, article)
        if stored:
            filed = lineage.file_article(conn, article_id, page=page, article=article,
                                         signature=signature, urls=urls)
    outcome = "stale" if not stored else "duplicate" if filed and filed.method == "url" else "stored"
    log_outcome("process", outcome, article_id=article_id, url=row.url, started=started,
                **_filed_keys(filed))
    return ProcessOutcome(article_id, outcome, filed=filed)


def refresh_article(ctx: Context, article_id: int) -> ProcessOutcome:
    """Fetch a stored article again; a changed text becomes its next version (issue 6)."""
    started = time.monotonic()
    with ctx.pool.connection() as conn:
        row = store.get_article(conn, article_id)
    if row is None or row.state != "stored":
        log_outcome("refresh", "stale", article_id=article_id, started=started)
        return ProcessOutcome(article_id, "stale")
    url = row.canonical_url or row.final_url or row.url
    try:
        page = fetch_url(url, ctx.limits, client=ctx.http,
                         accept="text/html,application/xhtml+xml;q=0.9,*/*;q=0.5")
        article = extract_article(page)
        signature = dedup.sign_text(article.text, article.title)
    except Transient as exc:
        log_outcome("refresh", "retry", article_id=article_id, url=url, reason=exc.reason,
                    started=started)
        return ProcessOutcome(article_id, "retry", reason=exc.reason, retry_after=exc.retry_after)
    except Permanent as exc:
        # A stored article whose page is gone keeps what we have; the reason is logged only.
        log_outcome("refresh", "failed", article_id=article_id, url=url, reason=exc.reason,
                    started=started)
        return ProcessOutcome(article_id, "failed", reason=exc.reason)
    with ctx.pool.connection() as conn, conn.transaction():
        filed = lineage.refile_article(conn, article_id, page=page, article=article,
                                       signature=signature)
    outcome = "stale" if filed is None else "version" if filed.new_version else "unchanged"
    log_outcome("refresh", outcome, article_id=article_id, url=url, started=started,
                **_filed_keys(filed))
    return ProcessOutcome(article_id, outcome, filed=filed)


def _filed_keys(filed: lineage.Filed | None) -> dict[str, object]:
    if filed is None:
        return {}
    return {"method": filed.method, "score": filed.score, "story_id": filed.story_id,
            "version": filed.version, "filed_as": filed.article_id}
