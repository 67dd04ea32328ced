"""./ops/bench store: what leasing and storing one article costs, apart from everything else.

The pipeline bench measures storing inside a busy service, where every figure moves with
the other processes on the cores. Here one process runs the worker's own
pipeline.process_article over pages served on 127.0.0.1, one article after another, and
measures:
- the client side: the task thread's CPU per article minus the CPU of the four steps any
  carrier of the article must run (fetch, extract, dedup signature, classify), read from
  each article's outcome line. What is left is the lease, the storing transaction, the
  outcome line itself and the glue between them;
- the Postgres side: the CPU of the pool's backends per article (fetch, extraction and
  classification never touch Postgres).

Two phases, as in a real feed: FIRST articles with texts not seen before (each page once),
then COPIES articles that repeat those texts word for word under new URLs (a wire story run
by many outlets), which the pipeline bench's long runs are mostly made of.

Uses DATABASE_URL and REDIS_URL when both are set (a database of its own, dropped at the
end; Redis is only connected to, articles need no politeness state), else embedded
servers. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import Site, cpu_seconds, load_pages, with_database  # the pipeline bench's

STEPS = ("fetch", "extract", "dedup", "classify")


class StepCpu(logging.Handler):
    """Sums the CPU of the four steps from process outcome lines."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu_ms = 0.0
        self.outcomes: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        """Add one outcome line's step CPU."""
        fields = vars(record)
        if fields.get("stage") != "process":
            return
        outcome = str(fields.get("outcome"))
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.cpu_ms += sum(float(fields.get(f"{step}_cpu_ms", 0.0)) for step in STEPS)


def main() -> None:
    """Store FIRST new texts, then COPIES copies of them, and print the cost per article."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=1000,
                        help="articles in the second phase, each a copy of a first-phase text")
    args = parser.parse_args()
    bodies, source = load_pages()
    work = Path(tempfile.mkdtemp(prefix="twbench-store-"))
    # Registered first, so it runs last at exit: after embedded servers (below) have stopped.
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    keep: list[object] = []
    if os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL"):
        admin_url, redis_url = os.environ["DATABASE_URL"], os.environ["REDIS_URL"]
    else:
        from worker.embedded import start_embedded

        services = start_embedded(work / "embedded")
        keep.append(services)  # its servers stop when this process exits
        admin_url, redis_url = services.admin_url, services.redis_url
    db_name = f"talkwire_bench_store_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db_name)))
    try:
        measure(with_database(admin_url, db_name), db_name, redis_url, bodies, source,
                args.copies, work)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(db_name)))


def measure(database_url: str, db_name: str, redis_url: str, bodies: list[bytes], source: str,
            copies: int, work: Path) -> None:
    """Run both phases against the fresh database and print their figures."""
    first = len(bodies)
    os.environ.update({"DATABASE_URL": database_url, "REDIS_URL": redis_url,
                       "TALKWIRE_REDIS_PREFIX": f"twbench-store-{db_name[-8:]}:",
                       "TALKWIRE_DEMO": "false",
                       "TALKWIRE_FETCH_ALLOW_NETWORKS": "127.0.0.0/8",
                       "TALKWIRE_DATA_DIR": str(work / "data")})
    from worker import pipeline, store
    from worker.config import load_settings
    from worker.demo import serve_site

    print(f"pages: {source}; {first} new texts, then {copies} copies", flush=True)
    total = first + copies
    site = Site(bodies)  # served as the pipeline bench serves them
    routes = {f"s/{n}.html": site.page_route(n) for n in range(total)}
    server = serve_site(work, routes=routes)
    ctx = pipeline.open_context(load_settings())
    steps = StepCpu()
    logging.getLogger("talkwire").addHandler(steps)
    logging.getLogger("talkwire").setLevel(logging.INFO)
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            pipeline.prepare_database(conn)
            ids = [store.add_article_url(conn, f"{server.base_url}/s/{n}.html", origin="cli")[0]
                   for n in range(total)]
            # Warm the pool's connections (prepared statements) on a few first texts.
            for article_id in ids[:20]:
                pipeline.process_article(ctx, article_id)
            gc.freeze()  # as a worker does after its first task (worker.tasks.get_context)
            for label, phase in (("new texts", ids[20:first]), ("copies", ids[first:])):
                if not phase:
                    continue
                backends = [int(r[0]) for r in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s"
                    " AND pid <> pg_backend_pid()", (db_name,))]
                pg_before, steps.cpu_ms, steps.outcomes = cpu_seconds(backends), 0.0, {}
                cpu_before, wall_before = time.thread_time(), time.perf_counter()
                for article_id in phase:
                    pipeline.process_article(ctx, article_id)
                cpu = time.thread_time() - cpu_before
                wall = time.perf_counter() - wall_before
                pg = cpu_seconds(backends) - pg_before
                n = len(phase)
                client = 1000 * cpu / n - steps.cpu_ms / n
                print(f"{label} ({n}, outcomes {steps.outcomes}): lease and store, client "
                      f"{client:.2f} ms + Postgres {1000 * pg / n:.2f} ms of CPU per article"
                      f" ({1000 * wall / n:.1f} ms wall per article, all steps)", flush=True)
    finally:
        logging.getLogger("talkwire").removeHandler(steps)
        ctx.close()
        server.close()


if __name__ == "__main__":
    main()
