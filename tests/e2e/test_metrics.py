"""The metrics endpoint of a real worker, and `talkwire status`, while it ingests feeds."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Callable
from typing import Any

import psycopg
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import WorkerProcess, wait_for
from tests.e2e.test_cli import talkwire
from worker import store
from worker.celery_app import create_app
from worker.config import Settings
from worker.demo import SiteServer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on the endpoint, keyed by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def outcome_lines(output: str, stage: str) -> list[dict[str, Any]]:
    """The JSON outcome lines of one stage in a worker's output (Celery's own lines skipped)."""
    lines = []
    for line in output.splitlines():
        try:
            fields = json.loads(line)
        except ValueError:
            continue
        if isinstance(fields, dict) and fields.get("stage") == stage:
            lines.append(fields)
    return lines


def test_a_worker_serves_metrics_that_move_with_the_work(
        db: psycopg.Connection, site: SiteServer, settings: Settings,
        start_worker: Callable[..., WorkerProcess]) -> None:
    app: Celery = create_app(settings)
    store.add_feed(db, site.url("feeds/wire-en.xml"))
    store.add_feed(db, site.url("feeds/hostile.xml"))
    port = free_port()
    # Prefork children do the work; the parent serves what they counted.
    worker = start_worker(extra=("worker", "--queues", "poll,process", "--concurrency", "2",
                                 "--metrics-port", str(port)))
    worker.wait_ready()
    before = scrape(port)
    assert sample(before, "talkwire_articles_total", outcome="stored", reason="") == 0
    assert sample(before, "talkwire_step_duration_seconds_count", step="extract") == 0
    assert sample(before, "talkwire_feeds", status="active") == 2
    assert sample(before, "talkwire_state_up", store="postgres") == 1

    app.send_task("talkwire.dispatch_due_feeds")
    wait_for(lambda: db.execute("SELECT count(*) FROM articles WHERE state <> 'pending'")
             .fetchone()[0] == 4, 60, "four articles to finish")

    def counted() -> bool:
        now = scrape(port)
        return (sample(now, "talkwire_articles_total", outcome="stored", reason="") == 3
                and sample(now, "talkwire_articles_total", outcome="failed",
                           reason="blocked_address") == 1)

    wait_for(counted, 20, "the endpoint to count three stored and one blocked article")
    after = scrape(port)
    assert sample(after, "talkwire_outcomes_total", stage="poll", outcome="polled", reason="") == 2
    assert sample(after, "talkwire_stage_duration_seconds_count", stage="process") == 4
    assert sample(after, "talkwire_stage_duration_seconds_sum", stage="process") > 0
    # Where the time went, per step (issue 9): every article was fetched, the blocked one
    # went no further.
    assert sample(after, "talkwire_step_duration_seconds_count", step="fetch") == 4
    for step in ("extract", "dedup", "classify", "store"):
        assert sample(after, "talkwire_step_duration_seconds_count", step=step) == 3, step
    assert sample(after, "talkwire_step_duration_seconds_sum", step="extract") > 0
    # The task thread's CPU in a step never exceeds the step's wall time (the two clocks are
    # read one call apart, hence the slack).
    extract_cpu = sample(after, "talkwire_step_cpu_seconds_total", step="extract")
    assert 0 < extract_cpu <= sample(
        after, "talkwire_step_duration_seconds_sum", step="extract") + 1e-4
    assert sum(sample(after, "talkwire_dedup_decisions_total", method=m)
               for m in ("unique", "exact", "near", "update", "url")) == 3
    assert sum(v for (name, _), v in after.items() if name == "talkwire_labels_total") == 3
    assert sample(after, "talkwire_queue_depth", queue="process") == 0
    assert sample(after, "talkwire_articles", state="failed") == 1
    assert sample(after, "talkwire_last_stored_timestamp_seconds") > 0

    # Each article's outcome line says where its time went, step by step.
    outcomes = outcome_lines(worker.output(), "process")
    stored = [line for line in outcomes if line["outcome"] == "stored"]
    assert len(stored) == 3
    for line in stored:
        spent = [line[f"{step}_ms"] for step in ("fetch", "extract", "dedup", "classify",
                                                 "store")]
        assert all(isinstance(ms, (int, float)) and ms >= 0 for ms in spent), line
        assert sum(spent) <= line["duration_ms"] + 0.5, line  # each rounded to 0.1 ms
        for step in ("fetch", "extract", "dedup", "classify", "store"):
            assert 0 <= line[f"{step}_cpu_ms"] <= line[f"{step}_ms"] + 0.1, (step, line)
        assert line["extract_cpu_ms"] > 0, line
    [blocked] = [line for line in outcomes if line.get("reason") == "blocked_address"]
    assert isinstance(blocked["fetch_ms"], (int, float)) and blocked["fetch_ms"] >= 0
    assert "extract_ms" not in blocked and "store_ms" not in blocked
    assert "fetch_cpu_ms" in blocked and "extract_cpu_ms" not in blocked

    # The operator's view of the same state.
    shown = talkwire("status")
    assert shown.returncode == 0, shown.stderr
    lines = [" ".join(line.replace("│", " ").split()) for line in shown.stdout.splitlines()]
    assert "process 0" in lines and "poll 0" in lines
    assert "active 2 0" in " ".join(lines)  # two active feeds, none failing
    assert "stored in the last hour 3" in lines
    assert any(line.startswith("article blocked_address 1 ") for line in lines)
    labelled = sum(int(line.split()[1]) for line in lines
                   if line.split()[:1] and line.split()[0] in {"talks", "related", "syria_other",
                                                               "other"})
    assert labelled == 3
