"""Prometheus metrics: counters and histograms fed by `log_outcome`, gauges read on scrape.

Outcome counters and stage histograms are written by whichever process runs the work. Celery's
prefork pool runs tasks in child processes, so they use prometheus_client's multiprocess mode
(one mmap file per process under PROMETHEUS_MULTIPROC_DIR, summed on scrape; see the
prometheus_client docs, "Multiprocess Mode"). That mode is chosen when prometheus_client is
first imported, which is why nothing here imports it at module level: `prepare_multiprocess`
must run first, in the worker's main process, before it forks.

State that lives in Postgres and Redis (queue depth, feeds by status, last ingest, oldest
pending work) is not counted by anyone: `StateCollector` reads it when Prometheus scrapes.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# From a fast cache hit to a slow page near the fetch deadline; trafilatura alone is ~40 ms.
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# An article's steps run from ~1 ms (dedup signature, classification) to the fetch deadline;
# the finer low end tells a 1 ms step from a 4 ms one.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0)
QUEUES = ("poll", "process", "intake")

_LOG = logging.getLogger("talkwire.metrics")


@dataclass(frozen=True)
class Instruments:
    """The counters and histograms outcomes feed."""

    outcomes: Any
    articles: Any
    durations: Any
    steps: Any
    step_cpu: Any
    dedup: Any
    labels: Any
    dead_letters: Any
    publish_refusals: Any


@cache
def get_instruments() -> Instruments:
    """This process's instruments, created on first use (after the mode is chosen)."""
    from prometheus_client import Counter, Histogram

    return Instruments(
        outcomes=Counter("talkwire_outcomes_total", "One outcome per item per stage",
                         ["stage", "outcome", "reason"]),
        articles=Counter("talkwire_articles_total", "Articles processed, by outcome",
                         ["outcome", "reason"]),
        durations=Histogram("talkwire_stage_duration_seconds", "Time one item spent in a stage",
                            ["stage"], buckets=STAGE_BUCKETS),
        steps=Histogram("talkwire_step_duration_seconds",
                        "Time one article spent in a step: fetch, extract, dedup, classify, "
                        "store", ["step"], buckets=STEP_BUCKETS),
        step_cpu=Counter("talkwire_step_cpu_seconds", "CPU seconds the task thread spent in a "
                         "step; against talkwire_step_duration_seconds_sum it shows waiting",
                         ["step"]),
        dedup=Counter("talkwire_dedup_decisions_total", "Dedup decisions, by method",
                      ["method"]),
        labels=Counter("talkwire_labels_total", "Stored articles, by label", ["label"]),
        dead_letters=Counter("talkwire_dead_letters_total", "Producer messages dead-lettered",
                             ["reason"]),
        publish_refusals=Counter("talkwire_publish_refusals_total",
                                 "Publishes Redis refused for want of memory, by what followed "
                                 "(backoff: waited and tried again; gave_up: raised)",
                                 ["outcome"]),
    )


# Labelled children by (metric, label values). prometheus_client keeps the same children,
# but finding one through labels() validates and locks on every call: 15 calls per article
# were half of count_outcome's CPU (issue 9). Bounded as prometheus_client's own map is, by
# the label values that occur.
_CHILDREN: dict[tuple[int, tuple[str, ...]], Any] = {}


def _child(metric: Any, *values: str) -> Any:
    """metric.labels(*values), found once per process."""
    key = (id(metric), values)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(*values)
    return child


def count_outcome(stage: str, outcome: str, duration: float | None,
                  keys: Mapping[str, object], steps: Mapping[str, float] | None = None,
                  steps_cpu: Mapping[str, float] | None = None) -> None:
    """Count one item's outcome at one stage, and the wall and CPU seconds of each step that
    ran (called by log_outcome, once per item)."""
    m = get_instruments()
    reason = str(keys.get("reason") or "")
    _child(m.outcomes, stage, outcome, reason).inc()
    if duration is not None:
        _child(m.durations, stage).observe(duration)
    for step, seconds in (steps or {}).items():
        _child(m.steps, step).observe(seconds)
    for step, seconds in (steps_cpu or {}).items():
        _child(m.step_cpu, step).inc(seconds)
    if stage == "process":
        _child(m.articles, outcome, reason).inc()
    if stage == "publish":
        _child(m.publish_refusals, outcome).inc()
    if outcome == "dead_letter":
        _child(m.dead_letters, reason).inc()
    if keys.get("method") and outcome in {"stored", "duplicate", "version", "unchanged"}:
        _child(m.dedup, str(keys["method"])).inc()
    if keys.get("label") and outcome == "stored":
        _child(m.labels, str(keys["label"])).inc()


def prepare_multiprocess(data_dir: Path, name: str) -> Path:
    """Give this process tree a fresh multiprocess directory; call before prometheus_client loads."""
    if "prometheus_client" in sys.modules and not os.environ.get(MULTIPROC_ENV):
        # Too late to switch modes; children's counts would be invisible. Say so loudly.
        _LOG.warning("prometheus_client loaded before multiprocess mode was set")
    path = data_dir / "metrics" / f"{name}-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def serve_metrics(port: int, *, database_url: str | None, redis_url: str | None,
                  redis_prefix: str, addr: str = "0.0.0.0") -> bool:
    """Serve /metrics on port in a daemon thread; False (and a warning) if it cannot bind."""
    from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

    registry: Any = REGISTRY
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    if database_url and redis_url:
        registry.register(StateCollector(database_url, redis_url, redis_prefix))
    try:
        start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        # Metrics are worth a warning, never a worker that will not start.
        _LOG.warning("metrics endpoint not started", extra={"port": port, "error": str(exc)})
        return False
    _LOG.info("metrics endpoint started", extra={"port": port})
    return True


class StateCollector:
    """Gauges read from Postgres and Redis at scrape time: queues, feeds, last ingest."""

    def __init__(self, database_url: str, redis_url: str, redis_prefix: str) -> None:
        self.database_url = database_url
        self.redis_url = redis_url
        self.redis_prefix = redis_prefix

    def describe(self) -> list[Any]:
        """No fixed description: the registry then calls collect() only on scrape."""
        return []

    def collect(self) -> Iterator[Any]:
        """Yield the state gauges; a store that does not answer shows as talkwire_state_up 0."""
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("talkwire_state_up", "Whether the state scrape reached Postgres "
                               "and Redis", labels=["store"])
        yield from self._collect_queues(up)
        yield from self._collect_database(up)
        yield up

    def _collect_queues(self, up: Any) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from worker.politeness import redis_client

        depth = GaugeMetricFamily("talkwire_queue_depth", "Messages waiting in a Celery queue",
                                  labels=["queue"])
        try:
            client = redis_client(self.redis_url)
            try:
                for queue in QUEUES:
                    depth.add_metric([queue], client.llen(self.redis_prefix + queue))
                # kombu's redis transport keeps delivered-but-unacked messages in this hash.
                depth.add_metric(["unacked"], client.hlen(self.redis_prefix + "unacked"))
            finally:
                client.close()
        except Exception as exc:  # noqa: BLE001 - a scrape reports a down store, never raises
            _LOG.warning("metrics: redis unreachable", extra={"error": str(exc)[:200]})
            up.add_metric(["redis"], 0)
            return
        up.add_metric(["redis"], 1)
        yield depth

    def _collect_database(self, up: Any) -> Iterator[Any]:
        import psycopg
        from prometheus_client.core import GaugeMetricFamily

        from worker import store

        try:
            with psycopg.connect(self.database_url, connect_timeout=3) as conn:
                state = store.read_metric_state(conn)
        except psycopg.Error as exc:
            _LOG.warning("metrics: postgres unreachable", extra={"error": str(exc)[:200]})
            up.add_metric(["postgres"], 0)
            return
        up.add_metric(["postgres"], 1)
        feeds = GaugeMetricFamily("talkwire_feeds", "Feeds by status", labels=["status"])
        for status in ("active", "broken", "paused"):
            feeds.add_metric([status], state.feeds_by_status.get(status, 0))
        yield feeds
        failing = GaugeMetricFamily("talkwire_feeds_failing", "Active feeds whose last poll failed")
        failing.add_metric([], state.feeds_failing)
        yield failing
        articles = GaugeMetricFamily("talkwire_articles", "Articles by state", labels=["state"])
        for key in ("pending", "stored", "failed"):
            articles.add_metric([key], state.articles_by_state.get(key, 0))
        yield articles
        last = GaugeMetricFamily("talkwire_last_stored_timestamp_seconds",
                                 "Unix time the newest article was stored (0: none yet)")
        last.add_metric([], state.last_stored_at.timestamp() if state.last_stored_at else 0)
        yield last
        oldest = GaugeMetricFamily("talkwire_oldest_pending_age_seconds",
                                   "Age of the oldest pending article's last send (queue age)")
        oldest.add_metric([], state.oldest_pending_seconds)
        yield oldest
        dead = GaugeMetricFamily("talkwire_dead_letters", "Dead letters not yet replayed")
        dead.add_metric([], state.dead_letters_open)
        yield dead
        rounds = GaugeMetricFamily("talkwire_rounds_in_session",
                                   "Scheduled rounds whose dates include today")
        rounds.add_metric([], state.rounds_in_session)
        yield rounds
        scraped = GaugeMetricFamily("talkwire_state_scraped_timestamp_seconds",
                                    "When these state gauges were read")
        scraped.add_metric([], time.time())
        yield scraped
