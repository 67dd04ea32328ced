"""Runs the stages for one item: fetch, parse or extract, store. Knows nothing of Celery.

Each function reads the current state from the database, does its work, commits, and
returns a typed outcome. The caller (a task, the CLI) decides what to enqueue next, and
does so only after the commit.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import psycopg
from psycopg_pool import ConnectionPool

from worker import dedup, lineage, store
from worker.classify import (
    Classification,
    Knowledge,
    classify_article,
    compose_document,
    load_knowledge,
)
from worker.config import Settings
from worker.contracts import (
    IngestDocument,
    IngestUrl,
    InvalidMessage,
    decode_message,
    encode_payload,
)
from worker.errors import Overrun, Permanent, Transient
from worker.extract import article_from_text, extract_article
from worker.fetch import Client, fetch_url, make_client
from worker.logs import Steps, log_outcome
from worker.politeness import HostLimiter, HostPermit, HostWait, redis_client
from worker.poll import (
    cache_lifetime,
    entry_window,
    failure_backoff,
    feed_hint_seconds,
    jittered,
    next_poll_interval,
    parse_feed,
)
from worker.rounds import (
    LINKER_VERSION,
    SEED_ROUNDS,
    Round,
    RoundProposal,
    link_rounds,
    load_seed_rounds,
    new_round_id,
)
from worker.types import Article, FetchLimits, Page

_LOG = logging.getLogger("talkwire.pipeline")

# A feed in one of these states cannot get better by waiting (issue 3: hard errors). A body
# that is not a feed is hard too, but only for a feed that never parsed: one that worked and
# now serves an HTML page is most often in an outage (a maintenance or login page).
BROKEN_FEED_REASONS = frozenset({"http_410", "blocked_address", "blocked_scheme", "bad_url",
                                 "xml_entities"})
# A 429 pauses the whole host (rate limits are per client and host), for Retry-After but at
# most this long, so one answer cannot park every feed of a wire service for a day.
HOST_PENALTY_CAP = 3600
# A wait for a busy host up to this long is slept in the worker thread; a longer one goes back
# to the broker as a countdown, so no pool slot idles for it (slots that sleep make the other
# polls' countdowns fire late).
HOST_SLEEP_MAX = 0.25
FEED_ACCEPT = ("application/rss+xml, application/atom+xml, application/feed+json, "
               "application/xml;q=0.9, text/xml;q=0.9, */*;q=0.5")


@dataclass
class Context:
    """What the stages need from the process: settings, a DB pool, one HTTP client."""

    settings: Settings
    pool: ConnectionPool
    http: Client
    limits: FetchLimits
    knowledge: Knowledge
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
    return Context(settings=settings, pool=pool, http=make_client(), limits=limits,
                   knowledge=load_knowledge(), hosts=hosts)


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
    outcome: str  # stored | duplicate | failed | retry | stale
    reason: str | None = None
    retry_after: float | None = None
    label: str | None = None
    # Rounds this article created or changed: the caller relinks their stories after commit.
    changed_rounds: tuple[str, ...] = ()
    filed: lineage.Filed | None = None


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
        feed = None if slot is None else store.get_feed(conn, feed_id)
    if (feed is None or slot is None or feed.poll_slot != slot or feed.claimed_at is None
            or feed.poll_started_at is not None):
        # Another message already polls this slot, or a newer claim replaced it.
        log_outcome("poll", "stale", feed_id=feed_id, slot=slot, started=started)
        return PollOutcome(feed_id, "stale")

    # The host first, with nothing written: a poll that must wait costs no database write
    # unless its wait outlasts the claim's lease.
    permit: HostPermit | None = None
    if feed.host and ctx.hosts is not None:
        answer = _take_host(ctx, feed.host, reservation, max_sleep)
        if isinstance(answer, HostWait):
            keep = answer.reservation is not None
            lease_left = (feed.next_poll_at - datetime.now(timezone.utc)).total_seconds()
            if not keep or answer.seconds + 5 > lease_left:
                # Keeping the claim, the lease must outlast the countdown; giving it up, the
                # feed is simply due again when the host's queue has drained.
                delay = answer.seconds + (s.lease_seconds if keep else 0)
                with ctx.pool.connection() as conn:
                    store.defer_feed_poll(conn, feed_id, slot=slot, delay=delay, keep_claim=keep)
            log_outcome("poll", "deferred", feed_id=feed_id, host=feed.host,
                        wait=round(answer.seconds, 3), queued=keep, started=started)
            return PollOutcome(feed_id, "deferred", slot=slot if keep else None,
                               retry_in=answer.seconds, reservation=answer.reservation)
        permit = answer
    with ctx.pool.connection() as conn:
        begun = store.begin_feed_poll(conn, feed_id, slot=slot, lease_seconds=s.lease_seconds)
    if begun is None:
        # A duplicate delivery of this slot got here first.
        if permit is not None and ctx.hosts is not None:
            ctx.hosts.release(permit)
        log_outcome("poll", "stale", feed_id=feed_id, slot=slot, started=started)
        return PollOutcome(feed_id, "stale")
    feed = begun

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
    # A body that failed to parse came with a status of its own (a 200 maintenance page).
    status = page.status if page is not None else _http_status(exc.reason)
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


def process_article(ctx: Context, article_id: int, *, final_attempt: bool = False,
                    deadline: float | None = None) -> ProcessOutcome:
    """Fetch, extract and store one pending article; a transient failure asks for a retry.

    With a `deadline` (time.monotonic()), an extraction that ends past it raises Overrun
    and nothing is stored."""
    started = time.monotonic()
    # No psycopg pipeline mode here or in the storing transaction: it saved round trips but
    # cost more CPU than it saved, 0.4-0.7 ms client and 0.1-0.4 ms Postgres per article
    # (ops/bench store), and the workers are bound by CPU, not by waiting (issue 9).
    with ctx.pool.connection() as conn, conn.transaction():
        row = store.lease_article(conn, article_id, lease_seconds=ctx.settings.lease_seconds)
        if row is not None:
            # Google News redirect links are unwrapped offline (issue 6); a URL that is
            # already an alias of a stored article needs no fetch at all.
            target = dedup.unwrap_redirect_url(row.url)
            owner_id = store.find_article_by_url(conn, dedup.canonicalize_url(target))
    if row is None:
        # Already stored or failed, or another worker holds the lease: nothing to do.
        log_outcome("process", "stale", article_id=article_id, started=started)
        return ProcessOutcome(article_id, "stale")
    try:
        return _process_leased(ctx, row, target, owner_id, started=started,
                               final_attempt=final_attempt, deadline=deadline)
    except psycopg.OperationalError as exc:
        # The task retries this (a lost connection, a restart, a deadlock), and its retry
        # could not take the lease, committed above, until it ran out.
        _release_after_database_error(ctx, article_id, exc)
        raise


def _process_leased(ctx: Context, row: store.ArticleRow, target: str, owner_id: int | None, *,
                    started: float, final_attempt: bool,
                    deadline: float | None) -> ProcessOutcome:
    """process_article once the lease is held: file a known URL, or fetch and store."""
    article_id = row.id
    if row.attempts > ctx.settings.max_deliveries:
        return quarantine_article(ctx, row.id, row.url, row.attempts, started=started)
    urls = dedup.url_variants(row.url)
    if owner_id is not None and owner_id != article_id:
        with ctx.pool.connection() as conn, conn.transaction():
            filed = lineage.file_known_url(conn, article_id, owner_id, urls)
        log_outcome("process", "duplicate", article_id=article_id, url=row.url,
                    duplicate_of=owner_id, method="alias", started=started)
        return ProcessOutcome(article_id, "duplicate", filed=filed)
    steps = Steps()
    try:
        page, article, signature = read_page(ctx, target, steps)
        if deadline is not None and time.monotonic() > deadline:
            # The soft limit's signal can be lost: raised inside a `__del__` (trafilatura's
            # regex objects have one), Python reports and drops it. The clock is read again
            # so a late extraction ends as time_limit, as the signal would have (issue 8).
            raise Overrun(f"extraction ended {time.monotonic() - deadline:.1f} s past the "
                          "soft time limit")
    except Transient as exc:
        with ctx.pool.connection() as conn:
            if final_attempt:
                store.fail_article(conn, article_id, reason=exc.reason,
                                   detail=f"gave up after retries: {exc}")
            else:
                store.release_article(conn, article_id, reason=exc.reason, detail=str(exc))
        outcome = "failed" if final_attempt else "retry"
        log_outcome("process", outcome, article_id=article_id, url=row.url, reason=exc.reason,
                    started=started, steps=steps)
        return ProcessOutcome(article_id, outcome, reason=exc.reason, retry_after=exc.retry_after)
    except Permanent as exc:
        with ctx.pool.connection() as conn:
            store.fail_article(conn, article_id, reason=exc.reason, detail=str(exc))
        log_outcome("process", "failed", article_id=article_id, url=row.url, reason=exc.reason,
                    started=started, steps=steps)
        return ProcessOutcome(article_id, "failed", reason=exc.reason)
    published = article.published or row.feed_published_at
    with steps.timed("classify"):
        result = classify_text(ctx, title=article.title, text=article.text,
                               language=article.language, published=published)
    # The store step includes the pool checkout and the commit.
    with steps.timed("store"), ctx.pool.connection() as conn, conn.transaction():
        done = file_and_understand(conn, ctx, article_id, page=page, article=article,
                                   signature=signature, urls=urls, result=result,
                                   published=published, origin=row.origin)
    filed = done.filed if done else None
    outcome = "stale" if not done else "duplicate" if filed and filed.method == "url" else "stored"
    log_outcome("process", outcome, article_id=article_id, url=row.url, label=result.label,
                started=started, steps=steps, **_filed_keys(filed))
    return ProcessOutcome(article_id, outcome, filed=filed, label=result.label,
                          changed_rounds=done.changed_rounds if done else ())


def _release_after_database_error(ctx: Context, article_id: int,
                                  exc: psycopg.OperationalError) -> None:
    """Give up an article's lease after a database error cut its processing, if the database
    answers within a few seconds; if not, the lease runs out and the sweeper resends it."""
    try:
        with ctx.pool.connection(timeout=5) as conn:
            store.release_article(conn, article_id, reason="database_error",
                                  detail=f"database error while processing: {exc}"[:1000])
    except psycopg.OperationalError:
        pass


def read_page(ctx: Context, url: str, steps: Steps) -> tuple[Page, Article, dedup.Signature]:
    """Fetch an article page, extract it and sign its text, timing each step."""
    with steps.timed("fetch"):
        page = fetch_url(url, ctx.limits, client=ctx.http,
                         accept="text/html,application/xhtml+xml;q=0.9,*/*;q=0.5")
    with steps.timed("extract"):
        article = extract_article(page)
    with steps.timed("dedup"):
        signature = dedup.sign_text(article.text, article.title)
    return page, article, signature


def quarantine_article(ctx: Context, article_id: int, url: str, attempts: int, *,
                       started: float) -> ProcessOutcome:
    """Fail an article leased too often (its work keeps dying) and dead-letter it (issue 8)."""
    detail = (f"leased {attempts} times without finishing (TALKWIRE_MAX_DELIVERIES="
              f"{ctx.settings.max_deliveries}): its worker dies on it every time")
    raw = encode_payload({"task": "talkwire.process_article", "args": [article_id], "url": url})
    with ctx.pool.connection() as conn, conn.transaction():
        store.fail_article(conn, article_id, reason="poison_message", detail=detail)
        # source_ref makes the dead letter idempotent: a redelivery cannot add a second one.
        store.record_dead_letter(
            conn, via="celery", source_ref=f"process_article:{article_id}", kind=None,
            producer=None, reason="poison_message", detail=detail, payload=raw,
            payload_size=len(raw), payload_sha256=hashlib.sha256(raw).hexdigest(),
            payload_truncated=False)
    log_outcome("process", "failed", article_id=article_id, url=url, reason="poison_message",
                attempts=attempts, started=started)
    return ProcessOutcome(article_id, "failed", reason="poison_message")


def end_overrun_article(ctx: Context, article_id: int, *, final_attempt: bool) -> str:
    """Release (for a retry) or, on the final attempt, fail an article whose task outran the
    soft time limit; return the outcome, `retry` or `failed`."""
    detail = f"processing outran the soft time limit of {ctx.settings.task_soft_time_limit} s"
    with ctx.pool.connection() as conn:
        if final_attempt:
            store.fail_article(conn, article_id, reason="time_limit", detail=detail)
        else:
            # A busy machine can overrun once; a page that always does uses up the retries.
            store.release_article(conn, article_id, reason="time_limit", detail=detail)
    outcome = "failed" if final_attempt else "retry"
    log_outcome("process", outcome, article_id=article_id, reason="time_limit")
    return outcome


@dataclass(frozen=True)
class Understood:
    """What filing and understanding a freshly stored article decided."""

    filed: lineage.Filed
    changed_rounds: tuple[str, ...]


def file_and_understand(conn: psycopg.Connection, ctx: Context, article_id: int, *, page: Page,
                        article: Article, signature: dedup.Signature, urls: dict[str, str],
                        result: Classification, published: datetime | None,
                        origin: str) -> Understood | None:
    """In the storing transaction: store the text, file it into a story, store labels and
    round links, note it. None, with nothing written, if the article is no longer pending.

    Used by every path that stores an article (a fetched page, a producer's document), so
    each lands the same way. A copy under a URL we already hold (method `url`) takes its
    labels from the article it duplicates.
    """
    changed: list[str] = []
    # The change feed's rows (a copy joining its story, round links, the new article) are
    # written together at the end, so its lock is held from there until commit.
    with store.changes_last(conn):
        filed = lineage.file_article(conn, article_id, page=page, article=article,
                                     signature=signature, urls=urls)
        if filed is None:
            return None
        if filed.method != "url":
            store.save_classification(conn, article_id, result, fresh=True)
            changed = link_article(conn, ctx, article_id, result,
                                   compose_document(article.title, article.text),
                                   published.date() if published else None, fresh=True)
            store.append_change(conn, "article_created", "article", article_id,
                                {"url": page.url, "title": article.title, "origin": origin})
    return Understood(filed, tuple(changed))


def refresh_article(ctx: Context, article_id: int) -> ProcessOutcome:
    """Fetch a stored article again; a changed text becomes its next version (issue 6)."""
    started = time.monotonic()
    with ctx.pool.connection() as conn:
        row = store.get_article(conn, article_id)
    if row is None or row.state != "stored":
        log_outcome("refresh", "stale", article_id=article_id, started=started)
        return ProcessOutcome(article_id, "stale")
    url = row.canonical_url or row.final_url or row.url
    steps = Steps()
    try:
        page, article, signature = read_page(ctx, url, steps)
    except Transient as exc:
        log_outcome("refresh", "retry", article_id=article_id, url=url, reason=exc.reason,
                    started=started, steps=steps)
        return ProcessOutcome(article_id, "retry", reason=exc.reason, retry_after=exc.retry_after)
    except Permanent as exc:
        # A stored article whose page is gone keeps what we have; the reason is logged only.
        log_outcome("refresh", "failed", article_id=article_id, url=url, reason=exc.reason,
                    started=started, steps=steps)
        return ProcessOutcome(article_id, "failed", reason=exc.reason)
    published = article.published or row.published_at
    with steps.timed("classify"):
        result = classify_text(ctx, title=article.title, text=article.text,
                               language=article.language, published=published)
    changed: list[str] = []
    with steps.timed("store"), ctx.pool.connection() as conn, conn.transaction(), \
            store.changes_last(conn):
        filed = lineage.refile_article(conn, article_id, page=page, article=article,
                                       signature=signature)
        if filed is not None and filed.new_version:
            # Labels and round links follow the latest version of the text, and what it
            # teaches the registry is relinked like a new article's.
            store.save_classification(conn, article_id, result)
            changed = link_article(conn, ctx, article_id, result,
                                   compose_document(article.title, article.text),
                                   published.date() if published else None)
    outcome = "stale" if filed is None else "version" if filed.new_version else "unchanged"
    log_outcome("refresh", outcome, article_id=article_id, url=url, started=started,
                steps=steps, **_filed_keys(filed))
    return ProcessOutcome(article_id, outcome, filed=filed, changed_rounds=tuple(changed))


def _filed_keys(filed: lineage.Filed | None) -> dict[str, object]:
    if filed is None:
        return {}
    return {"method": filed.method, "score": filed.score, "story_id": filed.story_id,
            "version": filed.version, "filed_as": filed.article_id}


def classify_text(ctx: Context, *, title: str | None, text: str, language: str | None,
                  published: datetime | None) -> Classification:
    """Classify one article's text with this process's knowledge."""
    return classify_article(text=text, title=title, language=language,
                            published=published.date() if published else None,
                            knowledge=ctx.knowledge)


@dataclass(frozen=True)
class ReprocessOutcome:
    """What reclassifying one stored article changed."""

    article_id: int
    old_label: str | None
    new_label: str

    @property
    def changed(self) -> bool:
        """True when the label differs from the one stored before."""
        return self.old_label != self.new_label


def reclassify_stored(ctx: Context, item: store.StoredText) -> ReprocessOutcome:
    """Classify a stored article again under the current rules and store the result."""
    result = classify_text(ctx, title=item.title, text=item.body, language=item.language,
                           published=item.published_at)
    document = compose_document(item.title, item.body)
    with ctx.pool.connection() as conn, conn.transaction():
        old_label, _ = store.save_classification(conn, item.id, result)
        link_article(conn, ctx, item.id, result, document,
                     item.published_at.date() if item.published_at else None, learn=False)
    return ReprocessOutcome(item.id, old_label, result.label)


def link_article(conn: psycopg.Connection, ctx: Context, article_id: int,
                 result: Classification, document: str, published: date | None, *,
                 learn: bool = True, fresh: bool = False) -> list[str]:
    """Link one classified article to rounds, letting it teach the registry; return changed ids.

    Runs inside the caller's transaction, so links and registry changes commit with the
    article. Reprocessing passes learn=False: old stories must not re-announce rounds.
    `fresh`: the article was stored in this transaction and has no links yet.
    """
    registry = store.list_rounds(conn)
    linking = link_rounds(result, document=document, published=published, registry=registry)
    changed: list[str] = []
    if learn and linking.proposals:
        changed = apply_proposals(conn, ctx, linking.proposals, registry, article_id)
        if changed:
            registry = store.list_rounds(conn)
            linking = link_rounds(result, document=document, published=published,
                                  registry=registry)
    store.replace_round_links(conn, article_id, linking.links,
                              rules_version=f"{result.rules_version}+{LINKER_VERSION}",
                              fresh=fresh)
    return changed


def apply_proposals(conn: psycopg.Connection, ctx: Context, proposals: tuple[RoundProposal, ...],
                    registry: list[Round], article_id: int) -> list[str]:
    """Apply a story's proposals to the registry; return the ids of rounds that changed."""
    by_id = {r.id: r for r in registry}
    changed: list[str] = []
    for proposal in proposals:
        if proposal.kind == "create":
            round_id = new_round_id(proposal.track, proposal.number, proposal.start)
            info = ctx.knowledge.track(proposal.track)
            template = info.round_name if info and info.round_name else proposal.track + " {n}"
            name = template.format(n=proposal.number, roman=proposal.number)
            rnd = Round(round_id, proposal.track, proposal.number, name, proposal.start,
                        proposal.end, proposal.venue, "announced")
            if round_id not in by_id and store.insert_round(
                    conn, rnd, source="article", article_id=article_id,
                    note=f"announced: {proposal.evidence.text}"):
                by_id[round_id] = rnd
                changed.append(round_id)
            continue
        old = by_id.get(proposal.round_id or "")
        if old is None:
            continue
        if proposal.kind == "move":
            new = replace(old, start=proposal.start, end=proposal.end,
                          venue=proposal.venue or old.venue,
                          status="announced" if old.status == "postponed" else old.status)
            change = "dates_changed"
        else:
            status = {"confirm": "held", "postpone": "postponed", "cancel": "cancelled"}[proposal.kind]
            new, change = replace(old, status=status), "status_changed"
        if new != old:
            store.update_round(conn, old, new, change=change, source="article",
                               article_id=article_id)
            by_id[old.id] = new
            changed.append(old.id)
    return changed


def seed_registry(conn: psycopg.Connection, knowledge: Knowledge,
                  path: Path = SEED_ROUNDS) -> list[str]:
    """Load tracks and the shipped calendar into the registry; return ids added or corrected.

    Fields that an article set (per the round's provenance) are left alone; everything
    else follows the seed file, so a corrected date in seeds/rounds.csv takes effect.
    """
    store.upsert_tracks(conn, [(t.id, t.label) for t in knowledge.tracks])
    existing = {r.id: r for r in store.list_rounds(conn)}
    changed: list[str] = []
    for seed in load_seed_rounds(path):
        old = existing.get(seed.id)
        if old is None:
            if store.insert_round(conn, seed, source="seed", article_id=None, note=None):
                changed.append(seed.id)
            continue
        source = store.get_round_source(conn, seed.id)
        provenance = source[1] if source else {}
        learned = {f for f, origin in provenance.items()
                   if isinstance(origin, dict) and origin.get("source") == "article"}
        new = replace(
            seed,
            start=old.start if "start_date" in learned else seed.start,
            end=old.end if "end_date" in learned else seed.end,
            venue=old.venue if "venue" in learned else seed.venue,
            status=old.status if "status" in learned else seed.status,
        )
        if new != old:
            store.update_round(conn, old, new, change="seed_updated", source="seed",
                               article_id=None)
            changed.append(seed.id)
    # The first load changes no story's links: there is nothing to relink yet.
    return changed if existing else []


def prepare_database(conn: psycopg.Connection, knowledge: Knowledge | None = None) -> list[str]:
    """Apply migrations and seed the registry; return the ids of rounds the seed changed."""
    store.apply_migrations(conn)
    with conn.transaction():
        changed = seed_registry(conn, knowledge or load_knowledge())
    return changed


def relink_window(rnd: Round | None) -> tuple[date, date]:
    """The publication dates whose stories may link to a round (all time if unknown)."""
    if rnd is None or rnd.start is None:
        return date(1990, 1, 1), date(2100, 1, 1)
    # Previews run up to months ahead and retrospectives long after; a wide window is cheap
    # because only talks and related stories are read.
    return rnd.start - timedelta(days=180), (rnd.end or rnd.start) + timedelta(days=365)


def relink_round(ctx: Context, round_id: str) -> int:
    """Re-link the stories that may concern a round after it changed; return how many."""
    with ctx.pool.connection() as conn:
        rnd = next((r for r in store.list_rounds(conn) if r.id == round_id), None)
        start, end = relink_window(rnd)
        ids = store.list_articles_to_relink(conn, start=start, end=end, round_id=round_id)
    for article_id in ids:
        with ctx.pool.connection() as conn:
            item = store.get_stored_text(conn, article_id)
        if item is not None:
            reclassify_stored(ctx, item)
    log_outcome("relink", "done", round_id=round_id, articles=len(ids))
    return len(ids)


# --- producer messages (issue 7) --------------------------------------------------------

# A dead letter whose payload is above TALKWIRE_DEAD_LETTER_MAX_BYTES keeps this much of it.
DEAD_LETTER_HEAD_BYTES = 65536


@dataclass(frozen=True)
class IntakeOutcome:
    """What one producer message did."""

    outcome: str  # queued | known | stored | failed | duplicate | dead_letter
    article_id: int | None = None
    enqueue: tuple[int, ...] = ()  # articles whose process task the caller sends after commit
    reason: str | None = None
    relink: tuple[str, ...] = ()  # rounds a stored document changed: relinked after commit
    dead_letter_id: int | None = None


def accept_message(ctx: Context, payload: object, *, kind: str | None, via: str,
                   source_ref: str | None) -> IntakeOutcome:
    """Validate one producer message and act on it; bad input is dead-lettered, never raised."""
    try:
        message = decode_message(payload, kind=kind, max_bytes=ctx.settings.message_max_bytes)
    except InvalidMessage as exc:
        return reject_message(ctx, payload, exc, via=via, source_ref=source_ref)
    if isinstance(message, IngestUrl):
        outcome = ingest_url(ctx, message, via=via, source_ref=source_ref)
    else:
        outcome = ingest_document(ctx, message, via=via, source_ref=source_ref)
    if outcome.outcome == "duplicate" and outcome.reason == "idempotency_conflict":
        # Same key, different message: the producer reused a key (Stripe answers the same
        # way). The first message stands; this one is kept for a person to look at.
        return reject_message(ctx, payload, InvalidMessage(
            "idempotency_conflict", f"key {message.idempotency_key[:100]!r} was first used for "
            "a different message", producer=message.producer, kind=message.kind),
            via=via, source_ref=source_ref)
    return outcome


def reject_message(ctx: Context, payload: object, error: InvalidMessage, *, via: str,
                   source_ref: str | None) -> IntakeOutcome:
    """Store a rejected message as a dead letter with its reason; never raises on bad input."""
    raw = encode_payload(payload)
    truncated = len(raw) > ctx.settings.dead_letter_max_bytes
    # Everything but the payload (bytea) goes into text columns; a producer-made value with a
    # NUL or of another type must not make the dead letter itself fail.
    ref = _clean_text(source_ref, 200)
    producer = _clean_text(error.producer, 64)
    with ctx.pool.connection() as conn:
        dead_letter_id = store.record_dead_letter(
            conn, via=via, source_ref=ref, kind=error.kind, producer=producer,
            reason=error.reason, detail=_clean_text(error.detail, 2000) or "",
            payload=raw[:DEAD_LETTER_HEAD_BYTES] if truncated else raw,
            payload_size=len(raw), payload_sha256=hashlib.sha256(raw).hexdigest(),
            payload_truncated=truncated)
    log_outcome("intake", "dead_letter", via=via, source_ref=ref, reason=error.reason,
                producer=producer, dead_letter_id=dead_letter_id, detail=error.detail[:200])
    return IntakeOutcome("dead_letter", reason=error.reason, dead_letter_id=dead_letter_id)


def ingest_url(ctx: Context, message: IngestUrl, *, via: str,
               source_ref: str | None) -> IntakeOutcome:
    """Record a URL submission and its article row; the caller enqueues it after commit."""
    started = time.monotonic()
    created = False
    article_id: int | None = None
    with ctx.pool.connection() as conn, conn.transaction():
        claim = _claim(conn, message, via, source_ref)
        if claim.fresh:
            article_id, created = store.add_article_url(conn, message.url, origin="producer")
            store.link_submission(conn, claim.id, article_id)
    if not claim.fresh:
        return _duplicate(message, claim, via, started)
    # A URL talkwire already knows (from a feed or another producer) is not fetched again.
    outcome = "queued" if created else "known"
    log_outcome("intake", outcome, via=via, producer=message.producer, article_id=article_id,
                url=message.url, started=started)
    return IntakeOutcome(outcome, article_id, enqueue=(article_id,) if created and article_id else ())


def ingest_document(ctx: Context, message: IngestDocument, *, via: str,
                    source_ref: str | None) -> IntakeOutcome:
    """Extract a document a producer sent and store it, without a fetch, in one transaction."""
    started = time.monotonic()
    # Extraction runs before the transaction opens: no locks are held while trafilatura works.
    page = Page(url=message.url, final_url=message.url, status=200,
                body=message.content.encode("utf-8", "replace"),
                content_type=message.content_type, charset="utf-8")
    failure: Permanent | None = None
    article = None
    try:
        if message.content_type == "text/plain":
            article = article_from_text(message.url, message.content, title=message.title)
        else:
            article = extract_article(page)
            if article.title is None and message.title:
                article = replace(article, title=message.title)
    except Permanent as exc:
        failure = exc
    stored = False
    article_id: int | None = None
    relink: tuple[str, ...] = ()
    if article is not None:
        # Signature and labels are computed before the transaction, like extraction.
        signature = dedup.sign_text(article.text, article.title)
        published = article.published or message.hints.published_at
        result = classify_text(ctx, title=article.title, text=article.text,
                               language=article.language, published=published)
    with ctx.pool.connection() as conn, conn.transaction():
        claim = _claim(conn, message, via, source_ref)
        if claim.fresh:
            article_id, created = store.add_article_url(conn, message.url, origin="producer")
            store.link_submission(conn, claim.id, article_id)
            if article is not None:
                # False when the URL was already stored: a new version is dedup's business.
                done = file_and_understand(
                    conn, ctx, article_id, page=page, article=article, signature=signature,
                    urls=dedup.url_variants(message.url), result=result, published=published,
                    origin="producer")
                stored = done is not None
                relink = done.changed_rounds if done else ()
            elif failure is not None and created:
                store.fail_article(conn, article_id, reason=failure.reason, detail=str(failure))
    if not claim.fresh:
        return _duplicate(message, claim, via, started)
    outcome = "stored" if stored else ("failed" if failure is not None else "known")
    reason = failure.reason if failure is not None else None
    log_outcome("intake", outcome, via=via, producer=message.producer, article_id=article_id,
                url=message.url, reason=reason, started=started)
    return IntakeOutcome(outcome, article_id, reason=reason, relink=relink)


def _claim(conn: psycopg.Connection, message: IngestUrl | IngestDocument, via: str,
           source_ref: str | None) -> store.SubmissionClaim:
    return store.claim_submission(
        conn, producer=message.producer, idempotency_key=message.idempotency_key,
        kind=message.kind, schema_version=message.version, via=via, source_ref=source_ref,
        payload_sha256=message.digest, hints=message.hints.as_json())


def _duplicate(message: IngestUrl | IngestDocument, claim: store.SubmissionClaim, via: str,
               started: float) -> IntakeOutcome:
    # A resend is an outcome, not an error: nothing new is stored and nothing is enqueued.
    conflict = claim.payload_sha256 != message.digest
    log_outcome("intake", "duplicate", via=via, producer=message.producer,
                article_id=claim.article_id, url=message.url, conflict=conflict, started=started)
    return IntakeOutcome("duplicate", claim.article_id,
                         reason="idempotency_conflict" if conflict else None)


def _clean_text(value: object, limit: int) -> str | None:
    if value is None:
        return None
    return str(value).replace("\x00", "\\x00")[:limit]
