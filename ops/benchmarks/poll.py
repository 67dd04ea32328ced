"""Benchmark: full polling cycles over many feeds served from 127.0.0.x, through real workers.

    ./ops/bench poll --feeds 10000

Serves --feeds generated RSS feeds from --hosts local servers (each on its own loopback
address, so each is a separate host to the politeness limiter) in a child process, starts
--workers real `talkwire worker --queues poll --pool threads` processes on real Redis and
Postgres (the machine's when DATABASE_URL and REDIS_URL are set, embedded ones otherwise),
and runs --cycles full cycles: every feed made due, then the `talkwire.dispatch_due_feeds`
task that beat sends claims and enqueues them inside a worker, until every feed has recorded
a poll.

Cycle 1 is a first poll of everything (all 200, every item new). Later cycles are the steady
state: --changed of the feeds published 1-3 new items since, --etag of the servers send ETags
(304 when unchanged), and the others resend the same bytes (the body hash skips the parse).

Prints per cycle: feeds polled per second, p50/p95 poll latency (fetch start to committed
record, from the poll log), p50/p95 time from dispatch to recorded poll, the outcome mix, and
each worker's peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from worker import store  # noqa: E402
from worker.celery_app import POLL_QUEUE, create_app  # noqa: E402
from worker.cli import stop_process_groups  # noqa: E402
from worker.config import load_settings  # noqa: E402
from worker.demo import serve_site  # noqa: E402
from worker.pipeline import open_context  # noqa: E402
from worker.politeness import redis_client  # noqa: E402

HEADLINES = ["Astana talks resume on ceasefire monitoring", "Genève : reprise des pourparlers",
             "Переговоры в Астане возобновились", "Cenevre'de anayasa komitesi toplandı",
             "استئناف المحادثات في أستانا", "Genfer Gespräche gehen weiter"]


@dataclass
class FeedSet:
    """The generated feeds: each has a version (its newest item number) and ETag support.

    `versions` lives in shared memory: the driver bumps it, the server process reads it.
    """

    count: int
    items: int
    etag_share: float
    versions: Any = None

    def __post_init__(self) -> None:
        if self.versions is None:
            self.versions = multiprocessing.get_context("fork").Array(
                "i", [self.items] * self.count, lock=False)

    def has_etag(self, i: int) -> bool:
        return (i * 7919) % 1000 < self.etag_share * 1000

    def body(self, i: int, base: str) -> bytes:
        newest = self.versions[i]
        parts = ['<?xml version="1.0" encoding="UTF-8"?><rss version="2.0"><channel>'
                 f"<title>Bench feed {i}</title><link>{base}/</link><description>d</description>"]
        for n in range(newest, max(0, newest - self.items), -1):
            minute = n * 7 % 60
            parts.append(f"<item><title>{HEADLINES[n % len(HEADLINES)]} #{n}</title>"
                         f"<link>{base}/a/{i}/{n}.html</link><guid>bench-{i}-{n}</guid>"
                         f"<pubDate>Tue, 02 May 2017 {n // 60 % 24:02d}:{minute:02d}:00 GMT"
                         "</pubDate></item>")
        parts.append("</channel></rss>")
        return "".join(parts).encode()

    def answer(self, handler: BaseHTTPRequestHandler, base: str) -> None:
        i = int(handler.path.rsplit("/", 1)[1].split(".", 1)[0])
        tag = f'"{i}-{self.versions[i]}"'
        if self.has_etag(i) and handler.headers.get("If-None-Match") == tag:
            handler.send_response(304)
            handler.send_header("ETag", tag)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        body = self.body(i, base)
        handler.send_response(200)
        handler.send_header("Content-Type", "application/rss+xml; charset=utf-8")
        if self.has_etag(i):
            handler.send_header("ETag", tag)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


def serve_feeds(feeds: FeedSet, hosts: int, root: Path, bases: Any) -> None:
    """Child process: one server per host on 127.0.1.x, base URLs reported, serve forever."""
    sites = [serve_site(root, host=f"127.0.1.{h + 1}",
                        routes={f"f/{i}.xml": feeds.answer for i in range(h, feeds.count, hosts)})
             for h in range(hosts)]
    for site in sites:
        bases.put(site.base_url)
    while True:
        time.sleep(3600)


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process and its children (the thread pool has none), in MiB."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total / 1024


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(conn: psycopg.Connection, pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far per component; Postgres counts this database's backends only."""
    backends = [r[0] for r in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()").fetchall()]
    groups = {**pids, "postgres": backends}
    return {name: sum(cpu_seconds(p) for p in group) for name, group in groups.items()}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--feeds", type=int, default=10_000)
    parser.add_argument("--hosts", type=int, default=50, help="local servers, one per 127.0.1.x")
    parser.add_argument("--items", type=int, default=20, help="items per feed document")
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--changed", type=float, default=0.2,
                        help="share of feeds with new items in each later cycle")
    parser.add_argument("--etag", type=float, default=0.7, help="share of feeds sending ETags")
    parser.add_argument("--workers", type=int, default=2, help="poll worker processes")
    parser.add_argument("--threads", type=int, default=16, help="threads per poll worker")
    parser.add_argument("--host-concurrency", type=int, default=4,
                        help="TALKWIRE_HOST_MAX_CONCURRENT for the run")
    parser.add_argument("--host-spacing", type=float, default=0.0,
                        help="TALKWIRE_HOST_MIN_SPACING for the run (production default 1.0)")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()

    run_id = uuid.uuid4().hex[:8]
    keep: list[object] = []
    data_dir = Path(tempfile.mkdtemp(prefix="twbench-"))
    if os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL"):
        admin_url, redis_url = os.environ["DATABASE_URL"], os.environ["REDIS_URL"]
    else:
        from worker.embedded import start_embedded

        services = start_embedded(data_dir)
        keep.append(services)
        admin_url, redis_url = services.admin_url, services.redis_url
    db_name = f"talkwire_bench_{run_id}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db_name)))
    env = {
        "DATABASE_URL": with_database(admin_url, db_name), "REDIS_URL": redis_url,
        "TALKWIRE_REDIS_PREFIX": f"twbench-{run_id}:", "TALKWIRE_DATA_DIR": str(data_dir),
        "TALKWIRE_FETCH_ALLOW_NETWORKS": "127.0.0.0/8", "TALKWIRE_DEMO": "false",
        "TALKWIRE_HOST_MAX_CONCURRENT": str(args.host_concurrency),
        "TALKWIRE_HOST_MIN_SPACING": str(args.host_spacing),
        "TALKWIRE_DB_POOL_MAX": str(args.threads), "TALKWIRE_CLAIM_BATCH": "500",
    }
    os.environ.update(env)
    settings = load_settings()

    feeds = FeedSet(args.feeds, args.items, args.etag)
    # The site runs in its own process, so serving does not share a GIL with anything measured.
    fork = multiprocessing.get_context("fork")
    bases = fork.Queue()
    server = fork.Process(target=serve_feeds, args=(feeds, args.hosts, data_dir, bases),
                          daemon=True)
    server.start()
    base_urls = [bases.get(timeout=60) for _ in range(args.hosts)]
    base_urls.sort(key=lambda u: int(urlsplit(u).hostname.rsplit(".", 1)[1]))  # type: ignore[union-attr]
    workers: list[subprocess.Popen[bytes]] = []
    ctx = None
    ok = False
    try:
        with psycopg.connect(settings.database_url or "") as conn:
            store.apply_migrations(conn)
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO feeds (url, interval_seconds) VALUES (%s, %s)",
                    [(f"{base_urls[i % args.hosts]}/f/{i}.xml", settings.poll_interval_default)
                     for i in range(args.feeds)])
        log = open(data_dir / "workers.log", "ab")  # noqa: SIM115
        for n in range(args.workers):
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "worker", "--queues", "poll", "--pool",
                 "threads", "--concurrency", str(args.threads), "--name", f"bench{n}@%h",
                 "--loglevel", "WARNING"],
                cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
        app = create_app(settings)
        ctx = open_context(settings)
        time.sleep(3)  # workers connect to the broker
        print(f"poll benchmark: {args.feeds} feeds on {args.hosts} hosts, {args.items} items "
              f"each; {args.workers} workers x {args.threads} threads; per host at most "
              f"{args.host_concurrency} in flight, {args.host_spacing}s apart; "
              f"{os.cpu_count()} CPUs")
        rng = random.Random(1)
        for cycle in range(1, args.cycles + 1):
            if cycle > 1:
                for i in rng.sample(range(args.feeds), int(args.feeds * args.changed)):
                    feeds.versions[i] += rng.randint(1, 3)
            pids = {"workers": [w.pid for w in workers], "site": [server.pid or 0]}
            with ctx.pool.connection() as conn:
                cpu_before = cpu_snapshot(conn, pids)
                start_at = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
                store.make_feeds_due(conn)
            started = time.monotonic()
            app.send_task("talkwire.dispatch_due_feeds", queue=POLL_QUEUE)  # what beat sends
            deadline = started + args.timeout
            done = 0
            while time.monotonic() < deadline:
                with ctx.pool.connection() as conn:
                    done = conn.execute("SELECT count(*) FROM feeds WHERE last_polled_at >= %s",
                                        (start_at,)).fetchone()[0]  # type: ignore[index]
                if done >= args.feeds:
                    break
                if any(w.poll() is not None for w in workers):
                    raise SystemExit(f"a worker died; see {data_dir / 'workers.log'}")
                time.sleep(0.25)
            elapsed = time.monotonic() - started
            with ctx.pool.connection() as conn:
                cpu = {k: v - cpu_before.get(k, 0.0) for k, v in cpu_snapshot(conn, pids).items()}
                rows = conn.execute(
                    "SELECT outcome, duration_ms, extract(epoch FROM polled_at - %s)"
                    " FROM feed_polls WHERE polled_at >= %s", (start_at, start_at)).fetchall()
            latency = [float(r[1]) for r in rows if r[1] is not None]
            waited = [float(r[2]) * 1000 for r in rows]
            mix = Counter(r[0] for r in rows)
            kind = "first poll of every feed" if cycle == 1 else "steady state"
            print(f"\ncycle {cycle} ({kind}): {done}/{args.feeds} feeds in {elapsed:.1f}s "
                  f"= {done / elapsed:.0f} feeds/s")
            print(f"  poll latency (fetch to commit) p50 {percentile(latency, 50):.0f} ms, "
                  f"p95 {percentile(latency, 95):.0f} ms")
            print(f"  dispatch to recorded poll      p50 {percentile(waited, 50) / 1000:.1f} s, "
                  f"p95 {percentile(waited, 95) / 1000:.1f} s")
            print("  outcomes: " + ", ".join(f"{k} {v}" for k, v in mix.most_common()))
            # CPU per feed does not depend on what else the machine runs; wall time does.
            total = sum(cpu.values())
            print("  CPU per feed: " + ", ".join(f"{k} {v / max(done, 1) * 1000:.1f} ms"
                                                 for k, v in cpu.items())
                  + f"; total {total / max(done, 1) * 1000:.1f} ms -> "
                  f"{total / (os.cpu_count() or 1):.1f}s of {os.cpu_count()} idle CPUs per cycle")
            if done < args.feeds:
                print(f"  gave up after {args.timeout:.0f}s")
                break
        peaks = [peak_rss_mb(w.pid) for w in workers]
        print("\nworker peak RSS (VmHWM): " + ", ".join(f"{p:.0f} MiB" for p in peaks))
        ok = True
    finally:
        if ctx is not None:
            ctx.close()
        stop_process_groups(workers, timeout=30)
        server.terminate()
        client = redis_client(redis_url)
        for key in client.scan_iter(f"twbench-{run_id}:*", count=1000):
            client.delete(key)
        client.close()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(db_name)))
        if ok:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            print(f"worker logs kept in {data_dir}")


if __name__ == "__main__":
    main()
