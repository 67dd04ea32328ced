"""The process worker of `ops/bench pipeline --floor MODE`: a measuring device, not the service.

It runs the real `talkwire worker` (Celery, Redis, the lease, the alias lookup, fetch,
extract, dedup signature, classify, the outcome line and its metrics) with one step cut
away: filing and understanding the article, which is everything talkwire writes about it
besides its state. What the bench then measures is the floor under any design of that
step, with the queue and the lease kept as they are:

- `mark`: the article row is only marked stored (nothing of it is kept);
- `text`: the row is stored with its text and metadata by the service's own storing
  UPDATE (`store.store_article`), and nothing else: no story, aliases, versions,
  dedup decision, labels, facts, round links or change-feed rows.

Run as `python ops/benchmarks/floor_worker.py MODE <talkwire arguments>`; the prefork
children inherit the cut from this process.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from worker import dedup, lineage, pipeline, store
from worker.cli import main

MODES = ("mark", "text")


def cut_filing(mode: str) -> None:
    """Replace pipeline.file_and_understand in this process with the `mode` floor."""

    def file_floor(conn: psycopg.Connection, ctx: pipeline.Context, article_id: int, *,
                   page: Any, article: Any, **_: object) -> pipeline.Understood | None:
        if mode == "text":
            kept = store.store_article(conn, article_id, page, article,
                                       text_hash=dedup.content_hash(article.text))
        else:
            kept = conn.execute(
                "UPDATE articles SET state = 'stored', stored_at = now(), leased_until = NULL"
                " WHERE id = %s AND state = 'pending' RETURNING id", (article_id,)
            ).fetchone() is not None
        if not kept:
            return None
        return pipeline.Understood(lineage.Filed(article_id, "unique", 0.0, None, None, 1), ())

    pipeline.file_and_understand = file_floor  # type: ignore[assignment]


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in MODES:
        raise SystemExit(f"usage: floor_worker.py {{{','.join(MODES)}}} <talkwire arguments>")
    cut_filing(sys.argv.pop(1))
    main(prog_name="talkwire")
