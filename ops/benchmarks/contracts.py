"""Figures for issue 7: message validation, the stream intake, and change-feed appends.

    ./ops/bench contracts [--messages 2000] [--changes 2000]

Uses DATABASE_URL (as an admin URL: a scratch database is created and dropped) and REDIS_URL
(under a scratch key prefix, deleted afterwards); with neither set, embedded servers in a
temporary directory. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from worker import store, tasks
from worker.celery_app import create_app
from worker.config import load_settings
from worker.contracts import decode_message
from worker.intake import Intake, ensure_group
from worker.pipeline import open_context
from worker.politeness import redis_client

DOC = (Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "documents" /
       "geneva4-ar.html").read_text(encoding="utf-8")


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f}/s ({count} in {seconds:.2f} s)"


def bench_validation(n: int) -> None:
    url_msgs = [{"type": "ingest_url", "version": 1, "producer": "bench",
                 "url": f"https://wire.example/a/{i}?utm_source=x",
                 "hints": {"published_at": "2017-05-03", "language": "en"}} for i in range(n)]
    raw = [json.dumps(m).encode() for m in url_msgs]
    started = time.perf_counter()
    for payload in raw:
        decode_message(payload, kind=None)
    print(f"validate ingest_url (bytes -> typed): {rate(n, time.perf_counter() - started)}")
    big = json.dumps({"type": "ingest_document", "version": 1, "producer": "bench",
                      "url": "https://wire.example/big",
                      "document": {"content": DOC * 500}},
                     ensure_ascii=False).encode()  # about 1 MB of Arabic HTML
    started = time.perf_counter()
    for _ in range(20):
        decode_message(big, kind=None)
    elapsed = time.perf_counter() - started
    print(f"validate ingest_document of {len(big) / 1e6:.1f} MB: {rate(20, elapsed)}")


def bench_intake(settings: object, n: int) -> None:
    ctx = open_context(settings)  # type: ignore[arg-type]
    create_app(settings)  # type: ignore[arg-type]
    client = redis_client(settings.redis_url)  # type: ignore[attr-defined]
    intake = Intake(ctx, client, tasks.enqueue_followups, consumer="bench")
    ensure_group(client, intake.stream, intake.group)
    with client.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd(intake.stream, {"message": json.dumps({
                "type": "ingest_url", "version": 1, "producer": "bench",
                "url": f"https://wire.example/intake/{i}"})})
        pipe.execute()
    started = time.perf_counter()
    while intake.drain_once(block_ms=100):
        pass
    elapsed = time.perf_counter() - started
    print(f"stream intake, ingest_url (validate, commit, send task, XACK): {rate(n, elapsed)}"
          f"  outcomes={intake.stats.outcomes}")
    ctx.close()
    client.close()


def bench_changes(url: str, n: int, writers: int) -> None:
    per = n // writers

    def write() -> None:
        with psycopg.connect(url) as conn:
            for i in range(per):
                with conn.transaction():
                    store.append_change(conn, "article_created", "article", i, {"bench": True})

    threads = [threading.Thread(target=write) for _ in range(writers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    print(f"append_change, one per transaction, {writers} writer(s): "
          f"{rate(per * writers, elapsed)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--changes", type=int, default=2000)
    args = parser.parse_args()
    bench_validation(args.messages)

    keep = None
    if os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL"):
        admin, redis_url = os.environ["DATABASE_URL"], os.environ["REDIS_URL"]
    else:
        from worker.embedded import start_embedded

        tmp = Path(tempfile.mkdtemp(prefix="twbench-"))
        keep = start_embedded(tmp)
        admin, redis_url = keep.admin_url, keep.redis_url
    name = f"talkwire_bench_{uuid.uuid4().hex[:8]}"
    prefix = f"twbench-{uuid.uuid4().hex[:8]}:"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    url = urlunsplit(urlsplit(admin)._replace(path="/" + name))
    try:
        with psycopg.connect(url) as conn:
            store.apply_migrations(conn)
        settings = load_settings(database_url=url, redis_url=redis_url, redis_prefix=prefix)
        bench_intake(settings, args.messages)
        for writers in (1, 4):
            bench_changes(url, args.changes, writers)
    finally:
        client = redis_client(redis_url)
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)
        client.close()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                psycopg.sql.Identifier(name)))
        if keep is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
