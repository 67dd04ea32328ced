"""Structured logs: one JSON line per outcome, with stable keys.

Each item at each stage produces exactly one outcome line (`stage`, `outcome`, and the ids
that locate it: `feed_id`, `article_id`, `url`), so operators can count and grep them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from worker.metrics import count_outcome

_LOG = logging.getLogger("talkwire")
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None)))


class JsonFormatter(logging.Formatter):
    """Render a log record as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        """Format the record and its extra fields as JSON."""
        payload: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str, ensure_ascii=False)


def configure_logging(level: str = "INFO") -> None:
    """Send talkwire's logs to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    _LOG.handlers[:] = [handler]
    _LOG.setLevel(level)
    _LOG.propagate = False


class Steps:
    """Wall and CPU time of the steps one item went through, for its outcome line (issue 9).

    `with steps.timed("fetch"): ...` records the step even when it raises, so a failure's
    line shows the steps that ran. Steps that never ran have no entry. CPU is the task
    thread's own (time.thread_time): a step whose wall time is far above its CPU time was
    waiting, on the network, on Postgres or for a core.
    """

    __slots__ = ("cpu", "seconds")

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time the block as step `name`."""
        begun, begun_cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - begun
            self.cpu[name] = time.thread_time() - begun_cpu


def log_outcome(stage: str, outcome: str, *, started: float | None = None,
                steps: Steps | None = None, **keys: object) -> None:
    """Log the single outcome of one item at one stage, and count it (worker.metrics).

    With `steps`, the line also carries `<step>_ms` and `<step>_cpu_ms` for each step that
    ran."""
    fields: dict[str, object] = {"stage": stage, "outcome": outcome, **keys}
    duration = time.monotonic() - started if started is not None else None
    if duration is not None:
        fields["duration_ms"] = round(duration * 1000, 1)
    timings = steps.seconds if steps is not None else {}
    cpu = steps.cpu if steps is not None else {}
    for name, seconds in timings.items():
        fields[f"{name}_ms"] = round(seconds * 1000, 1)
        fields[f"{name}_cpu_ms"] = round(cpu[name] * 1000, 1)
    # One outcome, one log line, one counter increment (STYLE.md habits).
    count_outcome(stage, outcome, duration, keys, timings, cpu)
    level = logging.WARNING if outcome in {"failed", "retry", "backoff", "gave_up"} else logging.INFO
    _LOG.log(level, f"{stage} {outcome}", extra=fields)
