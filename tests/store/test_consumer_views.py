"""The talkwire_v1 views a consumer reads: labels, facts, rounds, timelines, stories."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from worker import pipeline, store
from worker.config import Settings
from worker.demo import SiteServer


def test_a_reader_sees_a_talks_story_with_its_labels_facts_rounds_and_timeline(
        ctx: pipeline.Context, db: psycopg.Connection, site: SiteServer, settings: Settings) -> None:
    for path in ("pages/seed-story-own-words.html", "pages/astana4-memorandum.html",
                 "pages/astana-festival.html"):
        article_id, _ = store.add_article_url(db, site.url(path), origin="cli")
        assert pipeline.process_article(ctx, article_id, final_attempt=True).outcome == "stored"
    reader = make_conninfo(settings.database_url or "", options="-c role=talkwire_reader")
    with psycopg.connect(reader) as conn:
        talks = conn.execute("SELECT headline, label, about_rounds FROM talkwire_v1.talks_stories"
                             " ORDER BY published_at").fetchall()
        assert [(label, rounds) for _, label, rounds in talks] == [
            ("talks", ["astana_4"]), ("talks", ["astana_4"])]
        actors = {r[0] for r in conn.execute(
            "SELECT value FROM talkwire_v1.article_facts WHERE kind = 'actor'")}
        assert {"Mohammad Alloush", "Staffan de Mistura"} <= actors
        timeline = conn.execute(
            "SELECT relation, headline, previous_round_id, next_round_id"
            " FROM talkwire_v1.round_timeline WHERE round_id = 'astana_4' ORDER BY published_at"
        ).fetchall()
        assert [t[0] for t in timeline] == ["about", "about"]
        assert timeline[0][2:] == ("astana_3", "astana_5")
        assert conn.execute("SELECT status FROM talkwire_v1.rounds WHERE round_id = 'geneva6'"
                            ).fetchone() == ("held",)
        assert conn.execute("SELECT count(*) FROM talkwire_v1.stories").fetchone() == (3,)
        assert conn.execute("SELECT count(*) FROM talkwire_v1.story_members").fetchone() == (3,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM round_links")
