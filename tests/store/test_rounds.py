"""The registry of rounds and the links to it, through the real pipeline on real Postgres.

Articles are fetched from the fixture site and processed in this process (the same
pipeline functions a worker runs); the registry learns, and stories are relinked.
"""

from __future__ import annotations

import re
import threading
from dataclasses import replace
from datetime import date
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import psycopg
import pytest

from tests.conftest import FIXTURES, SHARED, process_url, send_html, wait_for
from worker import pipeline, store
from worker.config import Settings
from worker.demo import SiteServer, serve_site
from worker.rounds import Round


def ingest(ctx: pipeline.Context, db: psycopg.Connection, url: str) -> int:
    outcome = process_url(ctx, db, url)
    assert outcome.outcome == "stored", outcome
    for round_id in outcome.changed_rounds:
        pipeline.relink_round(ctx, round_id)
    return outcome.article_id


def links(db: psycopg.Connection, article_id: int) -> set[tuple[str, str]]:
    return set(db.execute("SELECT relation, round_id FROM round_links WHERE article_id = %s",
                          (article_id,)).fetchall())


def round_row(db: psycopg.Connection, round_id: str) -> tuple[object, ...] | None:
    return db.execute("SELECT status, start_date, end_date, source, source_article_id"
                      " FROM rounds WHERE id = %s", (round_id,)).fetchone()


def test_the_registry_a_worker_keeps_follows_other_writers_and_rollbacks(
        db: psycopg.Connection, settings: Settings) -> None:
    # list_rounds keeps the registry in memory; it must still show every committed change,
    # its own uncommitted ones, and none that rolled back.
    def ids(conn: psycopg.Connection) -> set[str]:
        return {r.id for r in store.list_rounds(conn)}

    later = Round("astana_99", "astana", 99, "Astana 99", date(2031, 3, 1), date(2031, 3, 2),
                  "Astana", "announced")
    dropped = Round("astana_98", "astana", 98, "Astana 98", None, None, None, "announced")
    assert "astana_4" in ids(db) and "astana_99" not in ids(db)
    with psycopg.connect(settings.database_url or "") as other, other.transaction():
        assert store.insert_round(other, later, source="seed", article_id=None, note=None)
    assert "astana_99" in ids(db)
    moved = replace(later, start=date(2031, 4, 1), end=date(2031, 4, 2))
    with psycopg.connect(settings.database_url or "") as other, other.transaction():
        store.update_round(other, later, moved, change="dates_changed", source="seed",
                           article_id=None)
    assert [r.start for r in store.list_rounds(db) if r.id == "astana_99"] == [date(2031, 4, 1)]
    with pytest.raises(RuntimeError), db.transaction():
        assert store.insert_round(db, dropped, source="seed", article_id=None, note=None)
        assert "astana_98" in ids(db)
        raise RuntimeError("roll back")
    assert "astana_98" not in ids(db)


def test_the_seed_calendar_is_loaded_with_neighbours(db: psycopg.Connection) -> None:
    row = db.execute("SELECT start_date, end_date, venue, previous_round_id, next_round_id"
                     " FROM round_sequence WHERE id = 'astana_4'").fetchone()
    assert row == (date(2017, 5, 3), date(2017, 5, 4), "Astana", "astana_3", "astana_5")
    provenance = db.execute("SELECT provenance->'start_date'->>'source' FROM rounds"
                            " WHERE id = 'astana_4'").fetchone()
    assert provenance == ("seed",)


def test_own_words_seed_story_links_about_refers_to_and_announces(
        ctx: pipeline.Context, db: psycopg.Connection, site: SiteServer) -> None:
    article_id = ingest(ctx, db, site.url("pages/seed-story-own-words.html"))
    assert links(db, article_id) >= {("about", "astana_4"), ("refers_to", "astana_3"),
                                     ("announces", "geneva6")}
    evidence = dict(db.execute("SELECT round_id, evidence FROM round_links WHERE article_id = %s",
                               (article_id,)).fetchall())
    assert "fourth round" in evidence["astana_4"]
    assert all(evidence.values())


def test_an_announcement_creates_a_round_that_later_coverage_postpones_moves_and_confirms(
        ctx: pipeline.Context, db: psycopg.Connection, site: SiteServer) -> None:
    # A registry that does not know Astana 5 yet, as it was in early June 2017.
    db.execute("DELETE FROM rounds WHERE id = 'astana_5'")

    announce = ingest(ctx, db, site.url("rounds/astana5-announce-en.html"))
    assert round_row(db, "astana_5") == ("announced", date(2017, 6, 12), date(2017, 6, 13),
                                         "article", announce)
    assert ("about", "astana_5") in links(db, announce)

    postponed = ingest(ctx, db, site.url("rounds/astana5-postponed-fr.html"))
    assert round_row(db, "astana_5")[0] == "postponed"
    assert ("about", "astana_5") in links(db, postponed)

    moved = ingest(ctx, db, site.url("rounds/astana5-moved-ru.html"))
    assert round_row(db, "astana_5")[:3] == ("announced", date(2017, 7, 4), date(2017, 7, 5))

    opened = ingest(ctx, db, site.url("rounds/astana5-opens-de.html"))
    assert round_row(db, "astana_5")[0] == "held"
    assert ("about", "astana_5") in links(db, opened)
    assert ("refers_to", "astana_4") in links(db, opened)  # "der vorigen Runde im Mai"

    history = db.execute("SELECT change, article_id FROM round_changes WHERE round_id = 'astana_5'"
                         " ORDER BY id").fetchall()
    assert history == [("created", announce), ("status_changed", postponed),
                       ("dates_changed", moved), ("status_changed", opened)]
    # Each field says which article set it.
    assert db.execute("SELECT provenance->'start_date'->>'article_id',"
                      " provenance->'status'->>'article_id' FROM rounds WHERE id = 'astana_5'"
                      ).fetchone() == (str(moved), str(opened))


def test_two_writers_of_the_registry_queue_instead_of_deadlocking(
        db: psycopg.Connection, settings: Settings) -> None:
    # A creates a round and then marks Astana 4 postponed; B does the same meanwhile. B must
    # wait for A as a whole, not hold Astana 4's row while A waits for it.
    astana_4 = next(r for r in store.list_rounds(db) if r.id == "astana_4")
    confirmed = replace(astana_4, status="postponed")
    later = Round("astana_99", "astana", 99, "Astana 99", None, None, None, "announced")
    url = settings.database_url or ""
    errors: list[BaseException] = []
    with psycopg.connect(url) as a, psycopg.connect(url) as b:
        a.execute("SET lock_timeout = '20s'")
        store.insert_round(a, later, source="seed", article_id=None, note=None)
        b_pid = b.info.backend_pid

        def writer_b() -> None:
            try:
                with b.transaction():
                    store.update_round(b, astana_4, confirmed, change="status_changed",
                                       source="seed", article_id=None)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        thread = threading.Thread(target=writer_b)
        thread.start()
        wait_for(lambda: db.execute(
            "SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted",
            (b_pid,)).fetchone() == (1,), 10, "B to wait for A")
        store.update_round(a, astana_4, confirmed, change="status_changed", source="seed",
                           article_id=None)
        a.commit()
        thread.join(timeout=30)
    assert errors == []
    assert {r.id: r.status for r in store.list_rounds(db)}["astana_4"] == "postponed"
    assert "astana_99" in {r.id for r in store.list_rounds(db)}


def test_a_new_version_that_announces_a_round_creates_it_and_asks_for_a_relink(
        ctx: pipeline.Context, db: psycopg.Connection) -> None:
    # One URL whose page is rewritten between two fetches: first a look back at Astana 3,
    # then the announcement of Astana 5, which the registry does not know yet.
    db.execute("DELETE FROM rounds WHERE id = 'astana_5'")
    serving = {"page": "astana3-last-month-en.html"}

    def rewritten(handler: BaseHTTPRequestHandler, base: str) -> None:
        html = (FIXTURES / "site" / "rounds" / serving["page"]).read_text(encoding="utf-8")
        # Without its own canonical link the page is refetched from this URL.
        html = re.sub(r'<link rel="canonical"[^>]*>', "", html.replace("{base}", base))
        send_html(handler, html.encode())

    server = serve_site(FIXTURES / "site", routes={"live/talks.html": rewritten})
    try:
        first = process_url(ctx, db, server.url("live/talks.html"))
        assert first.outcome == "stored" and "astana_5" not in first.changed_rounds
        serving["page"] = "astana5-announce-en.html"
        refreshed = pipeline.refresh_article(ctx, first.article_id)
    finally:
        server.close()
    assert refreshed.outcome == "version"
    assert refreshed.changed_rounds == ("astana_5",)
    assert round_row(db, "astana_5") == ("announced", date(2017, 6, 12), date(2017, 6, 13),
                                         "article", first.article_id)
    assert ("about", "astana_5") in links(db, first.article_id)


def test_a_story_that_looks_back_to_two_earlier_rounds(
        ctx: pipeline.Context, db: psycopg.Connection, site: SiteServer) -> None:
    article_id = ingest(ctx, db, site.url("rounds/astana6-two-earlier-tr.html"))
    assert links(db, article_id) == {("about", "astana_6"), ("refers_to", "astana_4"),
                                     ("refers_to", "astana_5")}


def test_last_months_talks_resolve_through_the_publication_date(
        ctx: pipeline.Context, db: psycopg.Connection, site: SiteServer) -> None:
    article_id = ingest(ctx, db, site.url("rounds/astana3-last-month-en.html"))
    assert ("refers_to", "astana_3") in links(db, article_id)


def test_a_calendar_correction_relinks_the_affected_stories(
        ctx: pipeline.Context, db: psycopg.Connection, site: SiteServer, tmp_path: Path) -> None:
    # A calendar with a typo: Astana 3 entered a year late.
    wrong = tmp_path / "rounds.csv"
    wrong.write_text("\n".join(
        row.replace("2017-03-14,2017-03-15", "2018-03-14,2018-03-15") if row.startswith("astana_3,")
        else row for row in pipeline.SEED_ROUNDS.read_text(encoding="utf-8").splitlines()) + "\n",
        encoding="utf-8")
    with db.transaction():
        assert pipeline.seed_registry(db, ctx.knowledge, wrong) == ["astana_3"]
    article_id = ingest(ctx, db, site.url("rounds/astana3-last-month-en.html"))
    # "Last month's talks" (March 2017) match no round in that calendar.
    assert links(db, article_id) == set()

    # The shipped calendar corrects it; the stories around Astana 3 are relinked.
    with db.transaction():
        changed = pipeline.seed_registry(db, ctx.knowledge)
    assert changed == ["astana_3"]
    assert pipeline.relink_round(ctx, "astana_3") >= 1
    assert links(db, article_id) == {("refers_to", "astana_3")}
    recorded = db.execute("SELECT round_id, change FROM round_link_changes WHERE article_id = %s"
                          " ORDER BY id", (article_id,)).fetchall()
    assert recorded == [("astana_3", "added")]
    assert db.execute("SELECT change FROM round_changes WHERE round_id = 'astana_3'"
                      " ORDER BY id").fetchall() == [("created",), ("seed_updated",), ("seed_updated",)]


def test_the_seed_story_from_shared_links_as_the_reference_case(
        ctx: pipeline.Context, db: psycopg.Connection) -> None:
    path = SHARED / "seeds" / "000_bd77398d2cc811f7.txt"
    if not path.exists():
        pytest.skip("../shared/seeds is absent")
    from worker.classify import compose_document
    from worker.rounds import link_rounds

    text = path.read_text(encoding="utf-8")
    result = pipeline.classify_article(text=text, title=None, language="en",
                                       published=date(2017, 5, 2), knowledge=ctx.knowledge)
    linking = link_rounds(result, document=compose_document(None, text),
                          published=date(2017, 5, 2), registry=store.list_rounds(db))
    got = {(link.relation, link.round_id): link.evidence.text for link in linking.links}
    assert {("about", "astana_4"), ("refers_to", "astana_3"), ("announces", "geneva6")} <= got.keys()
    assert all(got[key] for key in got)


def test_rounds_list_and_show_print_the_registry_and_a_timeline(
        ctx: pipeline.Context, db: psycopg.Connection, site: SiteServer) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    ingest(ctx, db, site.url("pages/seed-story-own-words.html"))
    ingest(ctx, db, site.url("pages/astana4-memorandum.html"))
    env = {**os.environ, "COLUMNS": "250"}
    listed = subprocess.run([sys.executable, "-m", "worker.cli", "rounds", "list", "--track",
                             "astana"], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if "│ astana_4 " in line)
    assert "2017-05-03 – 2017-05-04" in row and "│ 2 " in row  # two stories about it
    shown = subprocess.run([sys.executable, "-m", "worker.cli", "rounds", "show", "astana_4"],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "previous: astana_3   next: astana_5" in shown.stdout
    assert "2 stories" in shown.stdout
    assert "Guarantor states sign de-escalation memorandum" in shown.stdout
