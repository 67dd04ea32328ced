"""The Celery app factory: settings in, a configured app out; and publishing through it with
a bounded backoff while Redis is out of memory."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from celery import Celery
from kombu.utils.functional import retry_over_time
from redis.exceptions import OutOfMemoryError

from worker.config import Settings
from worker.logs import log_outcome

POLL_QUEUE = "poll"
PROCESS_QUEUE = "process"
# The public queue producers send talkwire.ingest_url / talkwire.ingest_document to (issue 7).
INTAKE_QUEUE = "intake"


def create_app(settings: Settings) -> Celery:
    """Build the Celery app for these settings (broker URL already resolved)."""
    assert settings.redis_url, "resolve the embedded servers before creating the app"
    app = Celery("talkwire", broker=settings.redis_url, include=["worker.tasks"])
    transport: dict[str, object] = {
        # Must exceed every time limit, lease and backoff (checked in config), else Redis
        # hands a still-running task to a second worker.
        "visibility_timeout": settings.visibility_timeout,
        # How often a worker looks for messages whose consumer died (unacked past the
        # visibility timeout) and puts them back. kombu's default scans every 10th sweep of
        # 10 s, so a dead worker's messages waited up to 100 s beyond the timeout (issue 8).
        "unacked_restore_interval": settings.unacked_restore_interval,
        "unacked_restore_throttle": 1,
    }
    if settings.redis_prefix:
        transport["global_keyprefix"] = settings.redis_prefix
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        # Ack after the task finishes, and requeue when the child running it dies, so a
        # SIGKILL or OOM kill does not lose the task (celery docs: "Should I use retry or
        # acks_late?").
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_max_memory_per_child=settings.worker_max_memory_kb,
        task_default_queue=PROCESS_QUEUE,
        task_routes={
            "talkwire.poll_feed": {"queue": POLL_QUEUE},
            "talkwire.poll_feeds": {"queue": POLL_QUEUE},
            "talkwire.dispatch_due_feeds": {"queue": POLL_QUEUE},
            "talkwire.sweep_stale_work": {"queue": POLL_QUEUE},
            "talkwire.process_article": {"queue": PROCESS_QUEUE},
            "talkwire.process_articles": {"queue": PROCESS_QUEUE},
            "talkwire.relink_round": {"queue": PROCESS_QUEUE},
            "talkwire.ingest_url": {"queue": INTAKE_QUEUE},
            "talkwire.ingest_document": {"queue": INTAKE_QUEUE},
        },
        # Dead-letters intake messages whose body is not JSON: Celery drops those before any
        # task runs (Consumer.on_decode_error), so the hook has to be in the consumer.
        worker_consumer="worker.tasks:IntakeConsumer",
        beat_schedule={
            "dispatch-due-feeds": {
                "task": "talkwire.dispatch_due_feeds",
                "schedule": settings.beat_interval,
                "options": {"expires": settings.beat_interval * 2},
            },
            "sweep-stale-work": {
                "task": "talkwire.sweep_stale_work",
                "schedule": settings.sweep_interval,
                "options": {"expires": settings.sweep_interval * 2},
            },
        },
        beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
    )
    app.talkwire_settings = settings  # type: ignore[attr-defined]
    return app


# The waits between refused publishes: 0.25 s, then 0.75, 1.25, ... up to 4 s each, and never
# past the task's total bound (Settings.publish_backoff_max).
PUBLISH_INTERVAL_START = 0.25
PUBLISH_INTERVAL_STEP = 0.5
PUBLISH_INTERVAL_MAX = 4.0

T = TypeVar("T")


class BrokerFull(Exception):
    """Redis refused a publish for want of memory; the refusal, as kombu raised it, is the
    cause."""


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__  # explicit wrapping only (`raise ... from`), as kombu does it


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception is, or was caused by, Redis's OOM reply."""
    # kombu wraps the reply: OperationalError for a single publish (its queue declaration is
    # refused first), BatchPublishError for a flushed Producer.batch; the reply is the cause.
    return any(isinstance(link, OutOfMemoryError) for link in _causes(exc))


def publish_with_backoff(send: Callable[[], T], *, bound: float, task: str,
                         count: int = 1) -> T:
    """Run `send`, and while Redis answers OOM, wait and run it again, for at most `bound`
    seconds in all; then re-raise the refusal.

    Celery's publish retry covers lost connections only, and an OOM reply is not one. `send`
    must be safe to repeat: a refused Producer.batch may have delivered part of its messages
    (kombu calls the outcome uncertain), and sending those again is harmless because every
    task re-reads its row and returns quietly when the work is done.
    """
    started = time.monotonic()
    end = started + bound

    def attempt() -> T:
        try:
            return send()
        except Exception as exc:
            if is_out_of_memory(exc):
                raise BrokerFull(str(exc)) from exc
            raise

    def wait(exc: BaseException, intervals: Iterator[float], retries: int) -> float:
        left = end - time.monotonic()
        if left <= 0:
            raise exc  # the bound is reached: give up (below)
        seconds = min(next(intervals), left)
        log_outcome("publish", "backoff", task=task, count=count, reason="out_of_memory",
                    attempt=retries + 1, wait_s=round(seconds, 2))
        return seconds

    try:
        if bound <= 0:  # kombu reads a timeout of 0 as "no limit"
            return attempt()
        return retry_over_time(attempt, BrokerFull, errback=wait, timeout=bound,
                               interval_start=PUBLISH_INTERVAL_START,
                               interval_step=PUBLISH_INTERVAL_STEP,
                               interval_max=PUBLISH_INTERVAL_MAX)
    except BrokerFull as full:
        refusal = full.__cause__
    log_outcome("publish", "gave_up", task=task, count=count, reason="out_of_memory",
                waited_s=round(time.monotonic() - started, 2))
    # The refusal itself goes up, as it did before there was a backoff: the caller's rows are
    # committed as pending, and the sweeper resends them.
    assert refusal is not None
    raise refusal
