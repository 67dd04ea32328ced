"""The Celery app factory: settings in, a configured app out."""

from __future__ import annotations

from celery import Celery

from worker.config import Settings

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
