"""Thin Celery adapters: decode the message, run the pipeline, enqueue the next step after
commit. Task names are a public contract: producers send them by name.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import time
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from celery import Task, current_app, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed

from worker import pipeline, store
from worker.celery_app import POLL_QUEUE, PROCESS_QUEUE, publish_with_backoff
from worker.contracts import InvalidMessage, sniff_producer
from worker.errors import Overrun
from worker.intake import accept_safely
from worker.logs import log_outcome

_LOG = logging.getLogger("talkwire.intake")
_PROCESS_LOG = logging.getLogger("talkwire.process")
_CONTEXT: pipeline.Context | None = None
_CONTEXT_PID: int | None = None


def get_context() -> pipeline.Context:
    """This process's context, opened on first use (after fork, never inherited across it)."""
    global _CONTEXT, _CONTEXT_PID
    if _CONTEXT is None or _CONTEXT_PID != os.getpid():
        _CONTEXT = pipeline.open_context(current_app.talkwire_settings)  # type: ignore[attr-defined]
        _CONTEXT_PID = os.getpid()
        # Everything loaded so far (Celery, the knowledge, compiled patterns) lives as long as
        # the process: out of the collector's sight, each collection during extraction scans
        # only the work's own objects (ops/bench pipeline: GC time per page down about 4x).
        gc.freeze()
    return _CONTEXT


def _publish_bound() -> float:
    return current_app.talkwire_settings.publish_backoff_max  # type: ignore[attr-defined,no-any-return]


Message = tuple[str, list[object], dict[str, Any]]  # task name, args, send_task options


def _send_many(name: str, arg_lists: Iterable[Sequence[object]], queue: str) -> None:
    """Send one task per argument list through one Redis pipeline (kombu Producer.batch),
    backing off while Redis is out of memory."""
    _send_messages([(name, list(args), {"queue": queue}) for args in arg_lists], task=name)


def _send_messages(messages: Sequence[Message], *, task: str) -> None:
    """Send tasks, of one name or several, through one Redis pipeline (kombu
    Producer.batch), backing off while Redis is out of memory."""
    # One round trip per 500 messages instead of one each: a beat tick over 10,000 due feeds
    # spends a third less on sending. Enqueue happens after commit, so a batch lost to a
    # crash is resent by the lease (polls) or the sweeper (articles), like any lost message.

    def send() -> None:
        with current_app.producer_or_acquire() as producer, producer.batch(max_size=500):
            for name, args, options in messages:
                current_app.send_task(name, args=args, producer=producer, **options)

    if messages:
        publish_with_backoff(send, bound=_publish_bound(), task=task, count=len(messages))


def enqueue_polls(feeds: Sequence[store.FeedRow], batch: int = 1) -> None:
    """Send the polls of claimed feeds, `batch` to a message (call only after the claim
    committed)."""
    if batch <= 1:
        _send_many("talkwire.poll_feed", ([f.id, f.poll_slot] for f in feeds), POLL_QUEUE)
        return
    _send_many("talkwire.poll_feeds", ([claims] for claims in batch_claims(feeds, batch)),
               POLL_QUEUE)


def batch_claims(feeds: Sequence[store.FeedRow], size: int) -> list[list[list[int]]]:
    """Deal claimed (feed id, slot) pairs into batches of at most `size`, each host spread
    over as many batches as it can be."""
    # A batch is polled in order by one thread, so feeds of one host in one batch would wait
    # on each other's politeness spacing: sorted by host and dealt round-robin, they part.
    if not feeds:
        return []
    batches: list[list[list[int]]] = [[] for _ in range(math.ceil(len(feeds) / size))]
    for n, feed in enumerate(sorted(feeds, key=lambda f: f.host or "")):
        batches[n % len(batches)].append([feed.id, feed.poll_slot])
    return batches


def enqueue_poll(feed_id: int, slot: int, *, countdown: float | None = None,
                 reservation: int | None = None) -> None:
    """Send the poll of one claimed slot, now or after a countdown (a host's queue)."""
    publish_with_backoff(lambda: current_app.send_task(
        "talkwire.poll_feed", args=[feed_id, slot],
        kwargs={"reservation": reservation} if reservation else None,
        queue=POLL_QUEUE, countdown=countdown), bound=_publish_bound(), task="talkwire.poll_feed")


def enqueue_articles(article_ids: Iterable[int]) -> None:
    """Send the process tasks of articles, TALKWIRE_PROCESS_BATCH to a message (call only
    after the rows committed)."""
    _send_messages(_article_messages(list(article_ids)), task="talkwire.process_articles")


def _article_messages(ids: Sequence[int]) -> list[Message]:
    """talkwire.process_articles messages of TALKWIRE_PROCESS_BATCH ids; one left over goes
    alone as talkwire.process_article."""
    size = current_app.talkwire_settings.process_batch  # type: ignore[attr-defined]
    chunks = [list(ids[n:n + size]) for n in range(0, len(ids), size)]
    return [("talkwire.process_articles", [chunk], {"queue": PROCESS_QUEUE}) if len(chunk) > 1
            else ("talkwire.process_article", chunk, {"queue": PROCESS_QUEUE})
            for chunk in chunks]


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


def _follow_up(feed_id: int, outcome: pipeline.PollOutcome) -> None:
    """After a poll: resend a poll deferred behind its host, when its place comes."""
    if outcome.outcome == "deferred" and outcome.slot is not None:
        enqueue_poll(feed_id, outcome.slot, countdown=outcome.retry_in,
                     reservation=outcome.reservation)


@shared_task(name="talkwire.poll_feed", bind=True, max_retries=None)
def poll_feed(self: Task, feed_id: object, slot: object = None,
              reservation: object = None) -> None:
    """Poll one claimed slot of a feed (no slot: claim it now) and enqueue its new articles."""
    fid = _message_id(feed_id)
    slot_no = None if slot is None else _message_id(slot)
    place = None if reservation is None else _message_id(reservation)
    if fid is None or (slot is not None and slot_no is None) or (
            reservation is not None and place is None):
        log_outcome("poll", "failed", reason="malformed_message",
                    payload=repr([feed_id, slot, reservation])[:200])
        return
    try:
        outcome = pipeline.poll_feed(get_context(), fid, slot=slot_no, reservation=place)
    except psycopg.OperationalError as exc:
        # The database is down or the connection broke mid-write: nothing was committed.
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries, None))
    _follow_up(fid, outcome)
    enqueue_articles(outcome.new_article_ids)


def _claim_pairs(value: object) -> list[tuple[int, int]] | None:
    if not isinstance(value, list) or not 0 < len(value) <= 1000:
        return None
    pairs = []
    for item in value:
        if not isinstance(item, list) or len(item) != 2:
            return None
        fid, slot = _message_id(item[0]), _message_id(item[1])
        if fid is None or slot is None:
            return None
        pairs.append((fid, slot))
    return pairs


@shared_task(name="talkwire.poll_feeds", bind=True, max_retries=None)
def poll_feeds(self: Task, claims: object) -> None:
    """Poll a batch of claimed [feed id, slot] pairs in turn and enqueue their new articles."""
    pairs = _claim_pairs(claims)
    if pairs is None:
        log_outcome("poll", "failed", reason="malformed_message", payload=repr(claims)[:200])
        return
    ctx = get_context()
    s = ctx.settings
    # Start no poll that could outlive the task's soft time limit, sending included (it may
    # back off on a full Redis); the rest go back as a batch.
    stop_at = time.monotonic() + max(
        1.0, s.task_soft_time_limit - s.fetch_deadline - s.publish_backoff_max - 5)
    new_ids: list[int] = []
    try:
        for n, (fid, slot) in enumerate(pairs):
            if time.monotonic() > stop_at:
                _send_many("talkwire.poll_feeds", [[[list(p) for p in pairs[n:]]]], POLL_QUEUE)
                break
            try:
                outcome = pipeline.poll_feed(ctx, fid, slot=slot)
            except psycopg.OperationalError as exc:
                rest = [list(p) for p in pairs[n:]]
                raise self.retry(exc=exc, args=[rest],
                                 countdown=_backoff(self.request.retries, None))
            _follow_up(fid, outcome)
            new_ids.extend(outcome.new_article_ids)
    finally:
        enqueue_articles(new_ids)  # all of them were committed


@shared_task(name="talkwire.process_article", bind=True, max_retries=None)
def process_article(self: Task, article_id: object) -> None:
    """Fetch, extract and store one article; retry transient failures with backoff."""
    # Celery's soft limit counts from here; the pipeline checks this clock too (Overrun).
    settings = current_app.talkwire_settings  # type: ignore[attr-defined]
    deadline = time.monotonic() + settings.task_soft_time_limit
    aid = _message_id(article_id)
    if aid is None:
        log_outcome("process", "failed", reason="malformed_message", payload=repr(article_id)[:200])
        return
    ctx = get_context()
    final = self.request.retries >= ctx.settings.max_retries
    try:
        outcome = pipeline.process_article(ctx, aid, final_attempt=final, deadline=deadline)
    except psycopg.OperationalError as exc:
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries, None))
    except (SoftTimeLimitExceeded, Overrun):
        # trafilatura has no in-process timeout: an overrun is retried like a transient
        # failure, and fails as time_limit once the retries are used up.
        if pipeline.end_overrun_article(ctx, aid, final_attempt=final) == "retry":
            raise self.retry(countdown=_backoff(self.request.retries, None)) from None
        return
    if outcome.outcome == "retry":
        raise self.retry(countdown=_backoff(self.request.retries, outcome.retry_after))
    enqueue_relinks(outcome.changed_rounds)


def _id_list(value: object) -> list[int] | None:
    if not isinstance(value, list) or not 0 < len(value) <= 100:
        return None
    ids = [_message_id(item) for item in value]
    return None if None in ids else ids  # type: ignore[return-value]


@shared_task(name="talkwire.process_articles", bind=True, max_retries=None)
def process_articles(self: Task, article_ids: object) -> None:
    """Process a batch of articles in turn (TALKWIRE_PROCESS_BATCH to a message).

    Each article keeps the rules of talkwire.process_article: one that must be retried is
    sent on alone as that task's next retry, and the others go on. Only the first article is
    sure of the whole soft time limit, so only it is charged a retry for outrunning it; a
    later one goes back, first of a new batch, with the articles not yet started. No article
    starts past half the soft limit (less when the fetch deadline and a publish backing off
    need more), and what is left goes back as new messages, sent together at the end."""
    started = time.monotonic()  # Celery's soft limit counts from here
    ids = _id_list(article_ids)
    if ids is None:
        log_outcome("process", "failed", reason="malformed_message",
                    payload=repr(article_ids)[:200])
        return
    ctx = get_context()
    s = ctx.settings
    soft = s.task_soft_time_limit
    deadline = started + soft
    stop_at = started + max(1.0, min(soft / 2, soft - s.fetch_deadline - s.publish_backoff_max - 5))
    retries = self.request.retries
    final = retries >= s.max_retries
    later: list[Message] = []  # single articles' retries
    changed: list[str] = []  # rounds whose links changed
    n, db_error = 0, None
    try:
        while n < len(ids) and not (n and time.monotonic() > stop_at):
            aid = ids[n]
            try:
                outcome = pipeline.process_article(ctx, aid, final_attempt=final,
                                                   deadline=deadline)
            except psycopg.OperationalError as exc:
                db_error = exc  # the database is away: this one and the rest retry together
                break
            except (SoftTimeLimitExceeded, Overrun):
                if n == 0:
                    if pipeline.end_overrun_article(ctx, aid, final_attempt=final) == "retry":
                        later.append(_retry_message(aid, retries, None))
                    n += 1
                else:
                    pipeline.end_overrun_article(ctx, aid, final_attempt=False)
                break  # past the soft limit the hard one is near
            except Exception:  # noqa: BLE001 - one article's bug must not hold up the others
                # As when talkwire.process_article fails this way: the article stays leased
                # and the sweeper sends it again once the lease runs out.
                _PROCESS_LOG.exception("processing failed", extra={"article_id": aid})
                n += 1
                continue
            if outcome.outcome == "retry":
                later.append(_retry_message(aid, retries, outcome.retry_after))
            changed.extend(outcome.changed_rounds)
            n += 1
    except SoftTimeLimitExceeded:
        pass  # it came between articles: what is left goes back below
    # One send for all of it, so a full Redis costs one bounded backoff. Lost with the
    # worker, these articles are pending and unleased: the sweeper sends them again.
    rest = [] if db_error is not None else _article_messages(ids[n:])
    _send_messages([*later, *rest, *_relink_messages(dict.fromkeys(changed))],
                   task="talkwire.process_articles")
    if db_error is not None:
        raise self.retry(exc=db_error, args=[ids[n:]], countdown=_backoff(retries, None))


def _retry_message(article_id: int, retries: int, retry_after: float | None) -> Message:
    """One article sent on alone as talkwire.process_article's next retry."""
    return ("talkwire.process_article", [article_id],
            {"queue": PROCESS_QUEUE, "retries": retries + 1,
             "countdown": _backoff(retries, retry_after)})


def enqueue_relinks(round_ids: Iterable[str]) -> None:
    """Send one relink task per changed round (call only after the change committed)."""
    _send_messages(_relink_messages(round_ids), task="talkwire.relink_round")


def _relink_messages(round_ids: Iterable[str]) -> list[Message]:
    return [("talkwire.relink_round", [r], {"queue": PROCESS_QUEUE}) for r in round_ids]


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
    enqueue_relinks(outcome.changed_rounds)


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
        enqueue_polls(feeds, ctx.settings.poll_batch)
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


# --- the public intake tasks (issue 7): producers send these by name --------------------

PUBLIC_TASKS = {"talkwire.ingest_url": "ingest_url", "talkwire.ingest_document": "ingest_document"}


def accept_task_message(task: Task, kind: str, args: tuple[object, ...],
                        kwargs: dict[str, object]) -> pipeline.IntakeOutcome:
    """Run one intake task's message through the validated path and enqueue after commit."""
    ctx = get_context()
    via, ref = "celery", task.request.id
    if len(args) == 1 and not kwargs:
        payload = args[0]
    elif not args and list(kwargs) == ["message"]:
        payload = kwargs["message"]
    else:
        return pipeline.reject_message(
            ctx, {"args": list(args), "kwargs": kwargs}, InvalidMessage(
                "bad_arguments", f"expected one message argument, got {len(args)} positional "
                f"and {sorted(kwargs)[:5]} keyword", kind=kind), via=via, source_ref=ref)
    # A database outage is raised (the caller retries; nothing was committed); a bug on one
    # message is dead-lettered as internal_error: bad input must never crash a worker.
    outcome = accept_safely(ctx, payload, kind=kind, via=via, source_ref=ref)
    enqueue_followups(outcome)
    return outcome


def enqueue_followups(outcome: pipeline.IntakeOutcome) -> None:
    """Send what a producer message leads to: process tasks, then relinks of changed rounds."""
    enqueue_articles(outcome.enqueue)
    enqueue_relinks(outcome.relink)


def _log_internal_error(exc: Exception, via: str, ref: str | None) -> None:
    _LOG.exception(
        "intake failed on a message", extra={"via": via, "source_ref": ref})


@shared_task(name="talkwire.ingest_url", bind=True, max_retries=None)
def ingest_url(self: Task, *args: object, **kwargs: object) -> None:
    """Accept an ingest_url message (schemas/messages); invalid ones become dead letters."""
    try:
        accept_task_message(self, "ingest_url", args, kwargs)
    except psycopg.OperationalError as exc:
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries, None))


@shared_task(name="talkwire.ingest_document", bind=True, max_retries=None)
def ingest_document(self: Task, *args: object, **kwargs: object) -> None:
    """Accept an ingest_document message: extract and store it without a fetch."""
    try:
        accept_task_message(self, "ingest_document", args, kwargs)
    except psycopg.OperationalError as exc:
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries, None))


class IntakeConsumer(Consumer):
    """The worker's consumer, plus dead letters for intake messages Celery cannot decode."""

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """Dead-letter an intake message whose body is not JSON, then let Celery ack it."""
        self._dead_letter_undecodable(message, "not_json", exc)
        super().on_decode_error(message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        """Dead-letter an intake message in a refused serializer (pickle, yaml, ...)."""
        if isinstance(exc, ContentDisallowed):
            self._dead_letter_undecodable(message, "unsupported_content_type", exc)
        super().on_invalid_task(body, message, exc)

    def _dead_letter_undecodable(self, message: Any, reason: str, exc: Exception) -> None:
        headers = getattr(message, "headers", None) or {}
        kind = PUBLIC_TASKS.get(str(headers.get("task"))) if isinstance(headers, dict) else None
        if kind is None:
            return  # not one of ours to answer for; Celery logs it as before
        ctx = get_context()
        detail = f"{exc}"[:300] + f" (content-type {message.content_type!r})"
        try:
            pipeline.reject_message(ctx, message.body, InvalidMessage(
                reason, detail, kind=kind, producer=sniff_producer(message.body)), via="celery",
                source_ref=headers.get("id"))
        except Exception:  # noqa: BLE001 - the consumer loop must survive a database outage
            _log_internal_error(exc, "celery", headers.get("id"))
