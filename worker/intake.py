"""The Redis Stream intake: producers in any language XADD JSON; a consumer group drains it.

Each entry carries one field, `message`, holding the JSON text of an ingest_url or
ingest_document message (with its `type`). Entries go through the same validated path as the
Celery tasks (`pipeline.accept_message`). An entry is acknowledged (XACK, then XDEL) only after
its database transaction committed and its follow-up task was sent, so a consumer killed
half-way leaves the entry pending, and another consumer claims it (XAUTOCLAIM) once it has
been idle for TALKWIRE_INTAKE_CLAIM_IDLE seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import psycopg
import redis

from worker import dedup, pipeline
from worker.config import Settings
from worker.contracts import InvalidMessage

_LOG = logging.getLogger("talkwire.intake")
MESSAGE_FIELD = b"message"

Enqueue = Callable[[pipeline.IntakeOutcome], None]


@dataclass
class IntakeStats:
    """Counts of what one intake run did, by outcome."""

    outcomes: dict[str, int] = field(default_factory=dict)

    def add(self, outcome: str) -> None:
        """Count one entry's outcome."""
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


def resolve_stream_key(settings: Settings) -> str:
    """The intake stream's Redis key, under the deployment's key prefix."""
    return settings.redis_prefix + settings.intake_stream


def ensure_group(client: redis.Redis, stream: str, group: str) -> None:
    """Create the consumer group (and the stream) unless they exist."""
    try:
        # From id 0: entries XADDed before talkwire first started are read too.
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def make_consumer_name() -> str:
    """A consumer name unique to this process, so a restart never inherits a dead one's name."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Intake:
    """One consumer of the intake stream's group."""

    def __init__(self, ctx: pipeline.Context, client: redis.Redis, enqueue: Enqueue, *,
                 consumer: str | None = None) -> None:
        s = ctx.settings
        self.ctx = ctx
        self.client = client
        self.enqueue = enqueue
        self.stream = resolve_stream_key(s)
        self.group = s.intake_group
        self.consumer = consumer or make_consumer_name()
        self.claim_idle_ms = int(s.intake_claim_idle * 1000)
        self.batch = s.intake_batch
        self._claim_cursor = "0-0"
        self.stats = IntakeStats()

    def drain_once(self, block_ms: int = 1000) -> int:
        """Handle what is due now: claimed stale entries first, then new ones; return how many."""
        entries = self._claim_stale()
        if not entries:
            reply = self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                           count=self.batch, block=block_ms)
            entries = reply[0][1] if reply else []
        for entry_id, fields in entries:
            self.handle_entry(entry_id, fields)
        return len(entries)

    def run(self, *, should_stop: Callable[[], bool], block_ms: int = 1000) -> IntakeStats:
        """Drain the stream until should_stop() says so; back off while the database is away."""
        delay = 1.0
        grouped = False
        while not should_stop():
            try:
                if not grouped:
                    ensure_group(self.client, self.stream, self.group)
                    grouped = True
                self.drain_once(block_ms)
                delay = 1.0
            except redis.ResponseError as exc:
                # A flushed Redis takes the stream and its group with it; make them again.
                # (Redis answers NOGROUP, or UNBLOCKED to a read blocked at that moment.)
                if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                    raise
                grouped = False
            except (psycopg.OperationalError, redis.ConnectionError) as exc:
                # Nothing was acknowledged: the entry stays pending and is claimed again.
                _LOG.warning("intake backing off", extra={"error": str(exc)[:300],
                                                          "delay": delay})
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        return self.stats

    def handle_entry(self, entry_id: bytes | str, fields: dict[bytes, bytes] | None) -> None:
        """Validate and apply one entry, then acknowledge it; invalid ones are dead-lettered."""
        ref = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        if not fields:
            # Deleted while pending (XDEL by someone; XADD cannot make an empty entry): nothing
            # left to do but acknowledge.
            self._ack(ref)
            return
        if MESSAGE_FIELD in fields:
            outcome = accept_safely(self.ctx, fields[MESSAGE_FIELD], kind=None, via="stream",
                                    source_ref=ref)
        else:
            outcome = pipeline.reject_message(
                self.ctx, _fields_json(fields), InvalidMessage(
                    "missing_field", "stream entry has no 'message' field (fields: "
                    f"{sorted(k.decode('utf-8', 'replace') for k in fields)[:10]})"),
                via="stream", source_ref=ref)
        # After the commit above: send the follow-up tasks, then acknowledge. A crash between
        # the two resends nothing twice: the redelivered entry is a duplicate, and the
        # sweeper resends the pending article.
        self.enqueue(outcome)
        self._ack(ref)
        self.stats.add(outcome.outcome)

    def _claim_stale(self) -> list[Any]:
        reply = self.client.xautoclaim(self.stream, self.group, self.consumer,
                                       min_idle_time=self.claim_idle_ms,
                                       start_id=self._claim_cursor, count=self.batch)
        # Redis 6.2 answers [cursor, entries]; 7.0 adds the ids it found deleted.
        cursor, entries = reply[0], reply[1]
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else cursor
        return [e for e in entries if e[0] is not None]

    def _ack(self, ref: str) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, ref)
            # The database is the record; a handled entry has no reason to stay in Redis.
            pipe.xdel(self.stream, ref)
            pipe.execute()


def accept_safely(ctx: pipeline.Context, payload: object, *, kind: str | None, via: str,
                  source_ref: str | None) -> pipeline.IntakeOutcome:
    """pipeline.accept_message, with a bug on one message dead-lettered as internal_error
    instead of stopping the intake; a database or Redis outage is raised."""
    try:
        return pipeline.accept_message(ctx, payload, kind=kind, via=via, source_ref=source_ref)
    except (psycopg.OperationalError, redis.ConnectionError):
        raise
    except Exception as exc:  # noqa: BLE001 - one bad message must not stop the intake
        _LOG.exception("intake failed on a message", extra={"via": via, "source_ref": source_ref})
        return pipeline.reject_message(
            ctx, payload, InvalidMessage("internal_error", f"{type(exc).__name__}: {exc}"[:500],
                                         kind=kind),
            via=via, source_ref=source_ref)


# --- backfill: a file of URLs or messages, through the same validated path ----------------

# Follow-up tasks are sent once this many articles are committed, and at the end: a backfill
# killed half-way leaves at most these unsent, pending, for the sweeper to send.
BACKFILL_SEND_EVERY = 500
BackfillSend = Callable[[list[int], list[str]], None]


class BackfillStopped(Exception):
    """A backfill stopped by a database or Redis outage; the lines before `line` are loaded."""

    def __init__(self, line: int, stats: IntakeStats, cause: Exception) -> None:
        super().__init__(f"stopped at line {line}: {type(cause).__name__}: {cause}"[:500])
        self.stats = stats


def backfill_item(line: str, producer: str) -> tuple[object, str | None] | None:
    """What one line of a backfill file asks for, as (payload, message kind): a bare URL is
    an ingest_url message from `producer`, for the URL's canonical form (so that two
    spellings of one URL are one submission, not a conflict); a line starting with `{` is a
    producer message in JSON that names its own `type`. None for a blank line or a `#`
    comment."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    if text.startswith("{"):
        return text, None
    return {"version": 1, "producer": producer, "url": dedup.canonicalize_url(text)}, "ingest_url"


def read_lines(stream: BinaryIO, limit: int) -> Iterator[tuple[bytes, int]]:
    """The lines of a byte stream, each cut to `limit` + 1 bytes, with the line's whole size:
    a line longer than `limit` is never held whole (the rest is read and dropped)."""
    while line := stream.readline(limit + 1):
        size = len(line)
        while size > limit and not line.endswith(b"\n"):
            more = stream.readline(1 << 20)
            if not more:
                break
            size += len(more)
            if more.endswith(b"\n"):
                break
        yield line, size


def backfill(ctx: pipeline.Context, stream: BinaryIO, *, source: str, producer: str,
             send: BackfillSend, advance: Callable[[int], None] = lambda n: None) -> IntakeStats:
    """Accept each line of a backfill file as a producer message, via `backfill`, and send
    the articles to process and the rounds to relink in batches after they committed.

    A line's source_ref is `<source>:<line number>:<hash of the line>`: loading the file again
    records no second dead letter for a bad line, and an edited line is a new one. Loading it
    again adds nothing else either: URLs keep their idempotency keys. `advance` is told the
    bytes of each line read. A database or Redis outage raises BackfillStopped."""
    limit = ctx.settings.message_max_bytes
    stats = IntakeStats()
    articles: list[int] = []
    rounds: list[str] = []
    number = 0

    def flush() -> None:
        batch, relink = articles[:], list(dict.fromkeys(rounds))
        articles.clear()
        rounds.clear()
        try:
            send(batch, relink)
        except Exception as exc:  # Redis away or full: the sweeper sends the rest
            raise BackfillStopped(number, stats, exc) from exc

    try:
        for number, (raw, size) in enumerate(read_lines(stream, limit), 1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
            ref = f"{source}:{number}:{hashlib.sha256(raw).hexdigest()[:12]}"[-200:]
            outcome = _backfill_line(ctx, raw, size, limit, producer=producer, ref=ref)
            if outcome is not None:
                stats.add(outcome.outcome if outcome.reason is None
                          else f"{outcome.outcome}:{outcome.reason}")
                articles.extend(outcome.enqueue)
                rounds.extend(outcome.relink)
                if len(articles) >= BACKFILL_SEND_EVERY:
                    flush()
            advance(size)
        flush()
    except psycopg.OperationalError as exc:
        flush()  # what committed before the database went away
        raise BackfillStopped(number, stats, exc) from exc
    return stats


def _backfill_line(ctx: pipeline.Context, raw: bytes, size: int, limit: int, *,
                   producer: str, ref: str) -> pipeline.IntakeOutcome | None:
    """Accept one line (None if blank or a comment); an oversized or non-UTF-8 line is a dead
    letter that keeps the line's bytes."""
    if size > limit:
        return pipeline.reject_message(ctx, raw[:limit], InvalidMessage(
            "too_large", f"a line of {size} bytes; the limit is {limit}"),
            via="backfill", source_ref=ref)
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return pipeline.reject_message(ctx, raw, InvalidMessage(
            "invalid_value", f"the line is not UTF-8 text: {exc}"[:300]),
            via="backfill", source_ref=ref)
    item = backfill_item(line, producer)
    if item is None:
        return None
    return accept_safely(ctx, item[0], kind=item[1], via="backfill", source_ref=ref)


def _fields_json(fields: dict[bytes, bytes]) -> bytes:
    return json.dumps({k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
                       for k, v in fields.items()}, ensure_ascii=False).encode()
