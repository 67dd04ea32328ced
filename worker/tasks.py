"""Thin Celery adapters: decode the message, run the pipeline, enqueue the next step after
commit. Task names are a public contract: producers send them by name.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable

import psycopg
from celery import Task, current_app, shared_task

from worker import pipeline, store
from worker.celery_app import POLL_QUEUE, PROCESS_QUEUE
from worker.logs import log_outcome

_CONTEXT: pipeline.Context | None = None
_CONTEXT_PID: int | None = None


def get_context() -> pipeline.Context:
    """This process's context, opened on first use (after fork, never inherited across it)."""
    global _CONTEXT, _CONTEXT_PID
    if _CONTEXT is None or _CONTEXT_PID != os.getpid():
        _CONTEXT = pipeline.open_context(current_app.talkwire_settings)  # type: ignore[attr-defined]
        _CONTEXT_PID = os.getpid()
    return _CONTEXT


def enqueue_polls(feed_ids: Iterable[int]) -> None:
    """Send one poll task per feed (call only after the claim committed)."""
    for feed_id in feed_ids:
        current_app.send_task("talkwire.poll_feed", args=[feed_id], queue=POLL_QUEUE)


def enqueue_articles(article_ids: Iterable[int]) -> None:
    """Send one process task per article (call only after the rows committed)."""
    for article_id in article_ids:
        current_app.send_task("talkwire.process_article", args=[article_id], queue=PROCESS_QUEUE)


def _backoff(retries: int, retry_after: float | None) -> float:
    cap = current_app.talkwire_settings.retry_backoff_max  # type: ignore[attr-defined]
    delay = min(cap, 2 ** (retries + 1)) * random.uniform(0.8, 1.2)  # jitter spreads a herd
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


def _message_id(value: object) -> int | None:
    # Messages come from outside; a malformed one is reported, never allowed to crash.
    if isinstance(value, bool):
        return None
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


@shared_task(name="talkwire.poll_feed", bind=True, max_retries=None)
def poll_feed(self: Task, feed_id: object) -> None:
    """Poll one feed and enqueue its new articles."""
    fid = _message_id(feed_id)
    if fid is None:
        log_outcome("poll", "failed", reason="malformed_message", payload=repr(feed_id)[:200])
        return
    try:
        outcome = pipeline.poll_feed(get_context(), fid)
    except psycopg.OperationalError as exc:
        # The database is down or the connection broke mid-write: nothing was committed.
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries, None))
    enqueue_articles(outcome.new_article_ids)


@shared_task(name="talkwire.process_article", bind=True, max_retries=None)
def process_article(self: Task, article_id: object) -> None:
    """Fetch, extract and store one article; retry transient failures with backoff."""
    aid = _message_id(article_id)
    if aid is None:
        log_outcome("process", "failed", reason="malformed_message", payload=repr(article_id)[:200])
        return
    ctx = get_context()
    final = self.request.retries >= ctx.settings.max_retries
    try:
        outcome = pipeline.process_article(ctx, aid, final_attempt=final)
    except psycopg.OperationalError as exc:
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries, None))
    if outcome.outcome == "retry":
        raise self.retry(countdown=_backoff(self.request.retries, outcome.retry_after))
    enqueue_relinks(outcome.changed_rounds)


def enqueue_relinks(round_ids: Iterable[str]) -> None:
    """Send one relink task per changed round (call only after the change committed)."""
    for round_id in round_ids:
        current_app.send_task("talkwire.relink_round", args=[round_id], queue=PROCESS_QUEUE)


@shared_task(name="talkwire.relink_round", bind=True, max_retries=None)
def relink_round(self: Task, round_id: object) -> None:
    """Re-link the stories around a round whose registry entry changed."""
    if not isinstance(round_id, str) or not round_id or len(round_id) > 200:
        log_outcome("relink", "failed", reason="malformed_message", payload=repr(round_id)[:200])
        return
    try:
        pipeline.relink_round(get_context(), round_id)
    except psycopg.OperationalError as exc:
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries, None))


@shared_task(name="talkwire.refresh_article", bind=True, max_retries=None)
def refresh_article(self: Task, article_id: object) -> None:
    """Fetch a stored article again and record a new version if its text changed."""
    aid = _message_id(article_id)
    if aid is None:
        log_outcome("refresh", "failed", reason="malformed_message", payload=repr(article_id)[:200])
        return
    ctx = get_context()
    try:
        outcome = pipeline.refresh_article(ctx, aid)
    except psycopg.OperationalError as exc:
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries, None))
    if outcome.outcome == "retry" and self.request.retries < ctx.settings.max_retries:
        raise self.retry(countdown=_backoff(self.request.retries, outcome.retry_after))


@shared_task(name="talkwire.dispatch_due_feeds")
def dispatch_due_feeds() -> int:
    """Claim the feeds that are due and enqueue a poll for each; run by beat."""
    return claim_and_enqueue_due_feeds(get_context())


def claim_and_enqueue_due_feeds(ctx: pipeline.Context) -> int:
    """Claim due feeds in batches, enqueueing each batch after its claim commits."""
    total = 0
    while True:
        with ctx.pool.connection() as conn:
            feeds = store.claim_due_feeds(conn, limit=ctx.settings.claim_batch,
                                          lease_seconds=ctx.settings.lease_seconds)
        enqueue_polls(f.id for f in feeds)
        total += len(feeds)
        if len(feeds) < ctx.settings.claim_batch:
            return total


@shared_task(name="talkwire.sweep_stale_work")
def sweep_stale_work() -> int:
    """Resend process tasks for pending articles whose message was lost; run by beat."""
    return resend_stale_articles(get_context())


def resend_stale_articles(ctx: pipeline.Context) -> int:
    """Resend tasks for pending articles whose lease and last send are both stale."""
    total = 0
    while True:
        with ctx.pool.connection() as conn:
            ids = store.sweep_stale_articles(conn, stale_seconds=ctx.settings.lease_seconds,
                                             limit=ctx.settings.claim_batch)
        enqueue_articles(ids)
        total += len(ids)
        if len(ids) < ctx.settings.claim_batch:
            if total:
                log_outcome("sweep", "resent", count=total)
            return total
