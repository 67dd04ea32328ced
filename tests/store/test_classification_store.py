"""Labels and facts land beside the article, in queryable rows, and can be reprocessed."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg

from tests.conftest import REPO, process_url
from worker import pipeline
from worker.classify import RULES_VERSION
from worker.demo import SiteServer


def ingest(ctx: pipeline.Context, db: psycopg.Connection, url: str) -> int:
    outcome = process_url(ctx, db, url)
    assert outcome.outcome == "stored", outcome
    return outcome.article_id


def test_label_and_facts_are_stored_with_evidence_and_rules_version(
        ctx: pipeline.Context, db: psycopg.Connection, site: SiteServer) -> None:
    article_id = ingest(ctx, db, site.url("pages/seed-story-own-words.html"))
    label = db.execute("SELECT label, tracks, rules_version, detail->>'label' FROM article_labels"
                       " WHERE article_id = %s", (article_id,)).fetchone()
    assert label == ("talks", ["astana", "geneva"], RULES_VERSION, "talks")

    actors = {r[0]: r[1] for r in db.execute(
        "SELECT value, role FROM article_facts WHERE article_id = %s AND kind = 'actor'",
        (article_id,))}
    assert {"Mohammad Alloush", "Jaish al-Islam", "High Negotiations Committee",
            "Bashar al-Jaafari", "Staffan de Mistura", "Russia", "Iran", "Turkey",
            "United States"} <= actors.keys()
    round_four = db.execute(
        "SELECT track, relation, date_start::text, date_end::text, evidence FROM article_facts"
        " WHERE article_id = %s AND kind = 'round' AND number = 4 AND date_start IS NOT NULL",
        (article_id,)).fetchone()
    assert round_four[:4] == ("astana", "current", "2017-05-03", "2017-05-04")
    # Evidence is the text at the stored span of title + blank line + body.
    title, body = db.execute("SELECT title, body FROM articles WHERE id = %s", (article_id,)).fetchone()
    document = f"{title}\n\n{body}"
    for start, end, evidence in db.execute(
            "SELECT span_start, span_end, evidence FROM article_facts WHERE article_id = %s",
            (article_id,)):
        assert document[start:end] == evidence


def test_a_kazakhstan_story_that_mentions_astana_is_not_talks(
        ctx: pipeline.Context, db: psycopg.Connection, site: SiteServer) -> None:
    article_id = ingest(ctx, db, site.url("pages/astana-festival.html"))
    assert db.execute("SELECT label FROM article_labels WHERE article_id = %s",
                      (article_id,)).fetchone() == ("other",)
    assert db.execute("SELECT count(*) FROM round_links WHERE article_id = %s",
                      (article_id,)).fetchone() == (0,)


def test_reprocess_reports_and_records_changed_labels(
        ctx: pipeline.Context, db: psycopg.Connection, site: SiteServer,
        run_env: dict[str, str]) -> None:
    talks = ingest(ctx, db, site.url("pages/astana4-arrival.html"))
    other = ingest(ctx, db, site.url("pages/astana-festival.html"))
    # As if older rules had got both wrong.
    db.execute("UPDATE article_labels SET label = 'related', rules_version = 'classify-old'"
               " WHERE article_id = %s", (talks,))
    db.execute("UPDATE article_labels SET label = 'syria_other', rules_version = 'classify-old'"
               " WHERE article_id = %s", (other,))
    result = subprocess.run([sys.executable, "-m", "worker.cli", "reprocess", "--since", "2017-01-01"],
                            env={**os.environ, "COLUMNS": "200"}, cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "reprocessed 2 article(s)" in result.stdout and "2 label(s) changed" in result.stdout
    changes = db.execute("SELECT article_id, old_label, new_label, old_rules_version,"
                         " new_rules_version FROM label_changes ORDER BY article_id").fetchall()
    assert changes == [(talks, "related", "talks", "classify-old", RULES_VERSION),
                       (other, "syria_other", "other", "classify-old", RULES_VERSION)]
    again = subprocess.run([sys.executable, "-m", "worker.cli", "reprocess"], env=os.environ.copy(),
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "0 label(s) changed" in again.stdout
