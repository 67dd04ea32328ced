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
from datetime import datetime, timezone

import httpx
from psycopg_pool import ConnectionPool

from worker import store
from worker.config import Settings
from worker.errors import Permanent, Transient
from worker.extract import extract_article
from worker.fetch import fetch_url, make_client
from worker.logs import log_outcome
from worker.politeness import HostLimiter, HostPermit, HostWait, redis_client
from worker.poll import (cache_lifetime, entry_window, failure_backoff, feed_hint_seconds,
                         jittered, next_poll_interval, parse_feed)
from worker.types import FetchLimits, Page

_LOG = logging.getLogger("talkwire.pipeline")

# A feed in one of these states cannot get better by waiting (issue 3: hard errors). A body
# that is not a feed is hard too, but only for a feed that never parsed: one that worked and
# now serves an HTML page is most often in an outage (a maintenance or login page).
BROKEN_FEED_REASONS = frozenset({"http_410", "blocked_address", "blocked_scheme", "bad_url"})
# A 429 pauses the whole host (rate limits are per client and host), for Retry-After but at
# most this long, so one answer cannot park every feed of a wire service for a day.
HOST_PENALTY_CAP = 3600
# A wait for a busy host up to this long is slept in the worker thread; a longer one goes back
# to the broker as a countdown, so no pool slot idles for it.
HOST_SLEEP_MAX = 1.0
FEED_ACCEPT = ("application/rss+xml, application/atom+xml, application/feed+json, "
               "application/xml;q=0.9, text/xml;q=0.9, */*;q=0.5")


@dataclass
class Context:
    """What the stages need from the process: settings, a DB pool, one HTTP client."""

    settings: Settings
    pool: ConnectionPool
    http: httpx.Client
    limits: FetchLimits
    hosts: HostLimiter | None = None

    def close(self) -> None:
        """Release the pool, the HTTP client and the Redis client."""
        self.http.close()
        self.pool.close()
        if self.hosts is not None:
            self.hosts.close()


def open_context(settings: Settings) -> Context:
    """Open the pool and HTTP client one process uses for all its items."""
    assert settings.database_url, "resolve the embedded servers before opening a context"
    limits = settings.fetch_limits()
    if limits.allow_networks:
        _LOG.warning("fetch allow-list is on", extra={"allow_networks": settings.fetch_allow_networks})
    pool = ConnectionPool(settings.database_url, min_size=settings.db_pool_min,
                          max_size=settings.db_pool_max, open=True, name="talkwire")
    hosts = None
    if settings.redis_url:
        hosts = HostLimiter(redis_client(settings.redis_url), prefix=settings.redis_prefix,
                            max_concurrent=settings.host_max_concurrent,
                            min_spacing=settings.host_min_spacing,
                            # A lease outlives any fetch, so only a dead worker's lease expires.
                            lease_seconds=settings.fetch_deadline + 5,
                            max_wait=settings.host_max_wait)
    return Context(settings=settings, pool=pool, http=make_client(limits), limits=limits,
                   hosts=hosts)


@dataclass(frozen=True)
class PollOutcome:
    """What one poll of one feed did."""

    feed_id: int
    outcome: str  # polled | not_modified | unchanged | failed | deferred | stale
    entries: int = 0
    new_article_ids: tuple[int, ...] = field(default=())
    reason: str | None = None
    # deferred with a place in the host's queue: send this slot again after retry_in seconds
    slot: int | None = None
    retry_in: float | None = None
    reservation: int | None = None


@dataclass(frozen=True)
class ProcessOutcome:
    """What processing one article did."""

    article_id: int
    outcome: str  # stored | failed | retry | stale
    reason: str | None = None
    retry_after: float | None = None


def _take_host(ctx: Context, host: str, reservation: int | None,
               max_sleep: float) -> HostPermit | HostWait:
    """A permit for host, sleeping through short waits up to max_sleep in all."""
    assert ctx.hosts is not None
    slept = 0.0
    while True:
        answer = ctx.hosts.acquire(host, reservation=reservation)
        if (isinstance(answer, HostPermit) or answer.reservation is None
                or slept + answer.seconds > max_sleep):
            return answer
        time.sleep(answer.seconds)
        slept += answer.seconds
        reservation = answer.reservation


def _http_status(reason: str) -> int | None:
    code = reason.removeprefix("http_")
    return int(code) if reason.startswith("http_") and code.isdigit() else None


def poll_feed(ctx: Context, feed_id: int, *, slot: int | None = None,
              reservation: int | None = None, take_over: bool = False,
              max_sleep: float = HOST_SLEEP_MAX) -> PollOutcome:
    """Poll one claimed slot of a feed (no slot: claim it now) within its host's limits;
    record entries, health and schedule; return the new article ids or a deferral."""
    started = time.monotonic()
    s = ctx.settings
    with ctx.pool.connection() as conn:
        if slot is None:
            claimed = store.claim_feed(conn, feed_id, lease_seconds=s.lease_seconds,
                                       take_over=take_over)
            slot = claimed.poll_slot if claimed is not None else None
        feed = None if slot is None else store.begin_feed_poll(
            conn, feed_id, slot=slot, lease_seconds=s.lease_seconds)
    if feed is None or slot is None:
        # Another message already polls this slot, or a newer claim replaced it.
        log_outcome("poll", "stale", feed_id=feed_id, slot=slot, started=started)
        return PollOutcome(feed_id, "stale")

    permit: HostPermit | None = None
    if feed.host and ctx.hosts is not None:
        answer = _take_host(ctx, feed.host, reservation, max_sleep)
        if isinstance(answer, HostWait):
            keep = answer.reservation is not None
            # Keeping the claim, the lease must outlast the countdown; giving it up, the feed
            # is simply due again when the host's queue has drained.
            delay = answer.seconds + (s.lease_seconds if keep else 0)
            with ctx.pool.connection() as conn:
                store.defer_feed_poll(conn, feed_id, slot=slot, delay=delay, keep_claim=keep)
            log_outcome("poll", "deferred", feed_id=feed_id, host=feed.host,
                        wait=round(answer.seconds, 3), queued=keep, started=started)
            return PollOutcome(feed_id, "deferred", slot=slot if keep else None,
                               retry_in=answer.seconds, reservation=answer.reservation)
        permit = answer

    fetch_started = time.monotonic()
    now = datetime.now(timezone.utc)
    full_fetch = (feed.last_full_fetch_at is None
                  or (now - feed.last_full_fetch_at).total_seconds() >= s.poll_full_fetch_every)
    conditional = not full_fetch and bool(feed.etag or feed.last_modified)
    parsed = None
    page = None
    try:
        try:
            # One validator: a server must ignore If-Modified-Since beside If-None-Match
            # (RFC 9110 section 13.1.3), and some mishandle the pair.
            page = fetch_url(feed.url, ctx.limits, client=ctx.http, accept=FEED_ACCEPT,
                             etag=feed.etag if conditional else None,
                             last_modified=feed.last_modified if conditional and not feed.etag
                             else None)
        finally:
            if permit is not None and ctx.hosts is not None:
                ctx.hosts.release(permit)
        body_hash = None if page.not_modified else hashlib.sha256(page.body).hexdigest()
        if body_hash is not None and body_hash != feed.body_hash:
            parsed = parse_feed(page.body, base_url=page.final_url,
                                content_type=page.content_type)
    except (Permanent, Transient) as exc:
        return _record_failure(ctx, feed, slot, exc, conditional=conditional, page=page,
                               started=fetch_started)

    assert page is not None  # fetch_url returned, or the except branch returned
    since = (now - feed.last_success_at).total_seconds() if feed.last_success_at else None
    cache_seconds = cache_lifetime(page.cache_control, page.expires, now=now)
    ttl_seconds = feed_hint_seconds(parsed) if parsed is not None else feed.ttl_seconds
    with ctx.pool.connection() as conn, conn.transaction():
        if parsed is not None:
            seen = store.record_sightings(conn, feed_id, parsed.entries)
            outcome = "polled"
        else:
            # 304, or a 200 whose bytes match the last body: nothing to parse or store.
            seen = store.Sightings(0, 0, [])
            outcome = "not_modified" if page.not_modified else "unchanged"
        interval, why = next_poll_interval(
            current=feed.interval_seconds, new_entries=seen.new_entries, total_entries=seen.seen,
            minimum=s.poll_interval_min, maximum=s.poll_interval_max, since_last_success=since,
            window_seconds=entry_window(parsed.entries, now=now) if parsed else None,
            ttl_seconds=ttl_seconds, cache_seconds=cache_seconds)
        next_in = jittered(interval, s.poll_jitter)
        recorded = store.record_poll_success(
            conn, feed_id, slot=slot, status=page.status, etag=page.etag,
            last_modified=page.last_modified, body_hash=body_hash, parsed=parsed is not None,
            title=parsed.title if parsed else None, site_url=parsed.link if parsed else None,
            ttl_seconds=ttl_seconds, interval_seconds=interval, interval_reason=why,
            next_poll_in=next_in, moved_to=page.moved_to,
            full_fetch=full_fetch and not page.not_modified)
        store.log_poll(conn, feed_id, outcome=outcome, http_status=page.status, reason=None,
                       detail=f"moved to {page.moved_to}" if page.moved_to else None,
                       conditional=conditional, parsed=parsed is not None,
                       entries=len(parsed.entries) if parsed else 0,
                       new_entries=seen.new_entries, body_bytes=len(page.body),
                       duration_ms=round((time.monotonic() - fetch_started) * 1000),
                       next_poll_in=next_in, interval_reason=why, keep=s.poll_log_keep)
    log_outcome("poll", outcome, feed_id=feed_id, url=feed.url, status=page.status,
                entries=seen.seen, new=seen.new_entries, interval=interval, why=why,
                late=not recorded or None, started=started)
    return PollOutcome(feed_id, outcome, entries=len(parsed.entries) if parsed else 0,
                       new_article_ids=tuple(seen.new_article_ids))


def _record_failure(ctx: Context, feed: store.FeedRow, slot: int, exc: Permanent | Transient,
                    *, conditional: bool, page: Page | None, started: float) -> PollOutcome:
    """Record a failed poll: hard failures break the feed, soft ones back off forever."""
    s = ctx.settings
    retry_after = exc.retry_after if isinstance(exc, Transient) else None
    if exc.reason == "http_429" and feed.host and ctx.hosts is not None:
        # Too Many Requests is about this client and host: every feed there waits.
        ctx.hosts.penalize(feed.host, min(retry_after or s.poll_backoff_base, HOST_PENALTY_CAP))
    broken = exc.reason in BROKEN_FEED_REASONS or (
        exc.reason == "not_a_feed" and feed.last_success_at is None)
    delay = jittered(failure_backoff(failures=feed.consecutive_failures,
                                     base=s.poll_backoff_base, cap=s.poll_backoff_cap,
                                     retry_after=retry_after), s.poll_jitter)
    status = _http_status(exc.reason)
    with ctx.pool.connection() as conn, conn.transaction():
        store.record_poll_failure(conn, feed.id, slot=slot, reason=exc.reason, detail=str(exc),
                                  status=status, broken=broken, retry_in=delay)
        store.log_poll(conn, feed.id, outcome="failed", http_status=status, reason=exc.reason,
                       detail=str(exc), conditional=conditional, parsed=page is not None,
                       entries=0, new_entries=0, body_bytes=None,
                       duration_ms=round((time.monotonic() - started) * 1000),
                       next_poll_in=delay, interval_reason="broken" if broken
                       else f"backoff:{exc.reason}", keep=s.poll_log_keep)
    log_outcome("poll", "failed", feed_id=feed.id, url=feed.url, reason=exc.reason,
                broken=broken, retry_in=delay, started=started)
    return PollOutcome(feed.id, "failed", reason=exc.reason)


def process_article(ctx: Context, article_id: int, *, final_attempt: bool = False) -> ProcessOutcome:
    """Fetch, extract and store one pending article; a transient failure asks for a retry."""
    started = time.monotonic()
    with ctx.pool.connection() as conn:
        row = store.lease_article(conn, article_id, lease_seconds=ctx.settings.lease_seconds)
    if row is None:
        # Already stored or failed, or another worker holds the lease: nothing to do.
        log_outcome("process", "stale", article_id=article_id, started=started)
        return ProcessOutcome(article_id, "stale")
    try:
        page = fetch_url(row.url, ctx.limits, client=ctx.http,
                         accept="text/html,application/xhtml+xml;q=0.9,*/*;q=0.5")
        article = extract_article(page)
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
    with ctx.pool.connection() as conn, conn.transaction():
        stored = store.store_article(conn, article_id, page, article)
    outcome = "stored" if stored else "stale"
    log_outcome("process", outcome, article_id=article_id, url=row.url, started=started)
    return ProcessOutcome(article_id, outcome)
