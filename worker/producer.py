"""A Python helper for producers: build a message, check it against the schema, send it.

    from worker.producer import submit_url
    submit_url("https://example.org/a", producer="newsroom-desk", language="en")

The message is validated here first, so a Python producer gets an `InvalidMessage` at once
instead of a dead letter later. Producers that do not import talkwire send the same message
with `send_task` by name (see docs/producers.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from celery import Celery

from worker.celery_app import INTAKE_QUEUE, publish_with_backoff
from worker.config import Settings
from worker.contracts import DEFAULT_MAX_BYTES, decode_message

_APP: Celery | None = None


@dataclass(frozen=True)
class Submitted:
    """A message handed to the broker: its task id and the idempotency key it is stored under."""

    task_id: str
    producer: str
    idempotency_key: str


def build_url_message(url: str, *, producer: str, idempotency_key: str | None = None,
                      published_at: datetime | date | str | None = None,
                      language: str | None = None, source_name: str | None = None) -> dict[str, Any]:
    """An ingest_url v1 message as a JSON-ready dict (not yet validated)."""
    message: dict[str, Any] = {"type": "ingest_url", "version": 1, "producer": producer,
                               "url": url}
    return _with_common(message, idempotency_key, published_at, language, source_name)


def build_document_message(url: str, content: str, *, producer: str,
                           content_type: str = "text/html", title: str | None = None,
                           idempotency_key: str | None = None,
                           published_at: datetime | date | str | None = None,
                           language: str | None = None,
                           source_name: str | None = None) -> dict[str, Any]:
    """An ingest_document v1 message as a JSON-ready dict (not yet validated)."""
    document: dict[str, Any] = {"content": content, "content_type": content_type}
    if title is not None:
        document["title"] = title
    message: dict[str, Any] = {"type": "ingest_document", "version": 1, "producer": producer,
                               "url": url, "document": document}
    return _with_common(message, idempotency_key, published_at, language, source_name)


def submit_url(url: str, *, producer: str, idempotency_key: str | None = None,
               published_at: datetime | date | str | None = None, language: str | None = None,
               source_name: str | None = None, app: Celery | None = None) -> Submitted:
    """Validate and send an ingest_url message; raise InvalidMessage if it breaks the schema."""
    message = build_url_message(url, producer=producer, idempotency_key=idempotency_key,
                                published_at=published_at, language=language,
                                source_name=source_name)
    return send_message("ingest_url", message, app=app)


def submit_document(url: str, content: str, *, producer: str, content_type: str = "text/html",
                    title: str | None = None, idempotency_key: str | None = None,
                    published_at: datetime | date | str | None = None,
                    language: str | None = None, source_name: str | None = None,
                    app: Celery | None = None) -> Submitted:
    """Validate and send an ingest_document message; raise InvalidMessage if it breaks the schema."""
    message = build_document_message(url, content, producer=producer, content_type=content_type,
                                     title=title, idempotency_key=idempotency_key,
                                     published_at=published_at, language=language,
                                     source_name=source_name)
    return send_message("ingest_document", message, app=app)


def send_message(kind: str, message: dict[str, Any], *, app: Celery | None = None) -> Submitted:
    """Validate a message of this kind and send it to its public task on the intake queue."""
    app = app or get_default_app()
    settings = getattr(app, "talkwire_settings", None)
    max_bytes = settings.message_max_bytes if settings is not None else DEFAULT_MAX_BYTES
    checked = decode_message(message, kind=kind, max_bytes=max_bytes)
    # A full Redis (maxmemory, noeviction) is waited out as in the workers, then raised.
    bound = settings.publish_backoff_max if settings is not None else \
        Settings.model_fields["publish_backoff_max"].default
    result = publish_with_backoff(
        lambda: app.send_task(f"talkwire.{kind}", args=[message], queue=INTAKE_QUEUE),
        bound=bound, task=f"talkwire.{kind}")
    return Submitted(task_id=result.id, producer=checked.producer,
                     idempotency_key=checked.idempotency_key)


def get_default_app() -> Celery:
    """The Celery app for talkwire's settings from the environment (REDIS_URL must be set)."""
    global _APP
    if _APP is None:
        from worker.celery_app import create_app
        from worker.config import load_settings

        settings = load_settings()
        if not settings.redis_url:
            raise RuntimeError("set REDIS_URL (and TALKWIRE_REDIS_PREFIX if the deployment "
                               "uses one), or pass app=")
        _APP = create_app(settings)
    return _APP


def _with_common(message: dict[str, Any], idempotency_key: str | None,
                 published_at: datetime | date | str | None, language: str | None,
                 source_name: str | None) -> dict[str, Any]:
    if idempotency_key is not None:
        message["idempotency_key"] = idempotency_key
    hints: dict[str, str] = {}
    if published_at is not None:
        hints["published_at"] = (published_at if isinstance(published_at, str)
                                 else published_at.isoformat())
    if language is not None:
        hints["language"] = language
    if source_name is not None:
        hints["source_name"] = source_name
    if hints:
        message["hints"] = hints
    return message
