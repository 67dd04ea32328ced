"""Dedup through the real pipeline: real Postgres, a real HTTP site, fixture articles.

Each test ingests URLs the way a producer or a feed would (an article row, then
`process_article`), and reads back what the store says: stories, members, versions,
aliases, decisions and the change records.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from urllib.parse import quote

import psycopg
import pytest

from tests.conftest import FIXTURES, process_url, send_html
from tests.unit.test_dedup import google_article_id
from worker import pipeline
from worker.demo import SiteServer, serve_site

PAGES = FIXTURES / "site" / "pages" / "dedup"
# Dynamic pages: a test puts (fixture file, paragraphs to keep) under a path, and the site
# serves that fixture with its canonical link pointing at the path itself.
DYNAMIC: dict[str, tuple[str, slice | None]] = {}


def serve_dynamic(path: str) -> Callable[[BaseHTTPRequestHandler, str], None]:
    def handle(handler: BaseHTTPRequestHandler, base: str) -> None:
        name, keep = DYNAMIC[path]
        html = (PAGES / name).read_text(encoding="utf-8").replace("{base}", base)
        html = re.sub(r'<link rel="canonical" href="[^"]*">',
                      f'<link rel="canonical" href="{base}/{path}">', html)
        if keep is not None:
            paragraphs = re.findall(r"<p>.*?</p>", html)
            for dropped in set(paragraphs) - set(paragraphs[keep]):
                html = html.replace(dropped, "")
        send_html(handler, html.encode())

    return handle


@pytest.fixture(scope="module")
def dyn_site() -> Iterator[SiteServer]:
    routes = {f"dyn/{i}.html": serve_dynamic(f"dyn/{i}.html") for i in range(1, 5)}
    server = serve_site(FIXTURES / "site", routes=routes)
    yield server
    server.close()


def members(db: psycopg.Connection, story_id: int) -> list[tuple[str, str, bool]]:
    return db.execute("SELECT outlet, headline, is_representative FROM story_members"
                      " WHERE story_id = %s ORDER BY article_id", (story_id,)).fetchall()


def changes(db: psycopg.Connection) -> list[str]:
    return [r[0] for r in db.execute("SELECT kind FROM story_changes ORDER BY id")]


def test_a_wire_story_from_three_outlets_is_one_story_with_three_members(
        db: psycopg.Connection, dyn_site: SiteServer, ctx: pipeline.Context) -> None:
    wire = process_url(ctx, db, dyn_site.url("pages/dedup/astana6-idlib-wire.html"))
    courier = process_url(ctx, db, dyn_site.url("pages/dedup/astana6-idlib-courier.html"))
    post = process_url(ctx, db, dyn_site.url("pages/dedup/astana6-idlib-post.html?utm_source=rss"))
    assert [o.outcome for o in (wire, courier, post)] == ["stored"] * 3
    assert wire.filed and courier.filed and post.filed
    assert wire.filed.method == "unique"
    assert (courier.filed.method, post.filed.method) == ("near", "near")
    assert wire.filed.story_id == courier.filed.story_id == post.filed.story_id

    # Every outlet keeps its own headline and URL; the wire's fuller text represents the story.
    assert members(db, wire.filed.story_id) == [
        ("Levant Wire", "Guarantors agree on Idlib monitors as Astana talks close", True),
        ("Gulf Courier", "Idlib monitors deal completes Syria de-escalation map", False),
        ("The Mediterranean Post", "Russia, Iran and Turkey to police Idlib zone", False),
    ]
    digest = db.execute("SELECT member_count, headline, outlets FROM story_digest").fetchall()
    assert digest == [(3, "Guarantors agree on Idlib monitors as Astana talks close",
                       ["Gulf Courier", "Levant Wire", "The Mediterranean Post"])]
    # The decision keeps its method, score and evidence.
    method, score, evidence = db.execute(
        "SELECT method, score, evidence FROM dedup_decisions WHERE article_id = %s",
        (post.article_id,)).fetchone()
    assert method == "near" and 0.8 < score < 1.0 and score == pytest.approx(evidence["containment"])
    assert evidence["matched_shingles"] > 200 and evidence["shared_bands"] >= 1
    assert changes(db) == ["story_created", "member_added", "member_added"]


def test_two_articles_about_the_same_round_are_not_merged(
        db: psycopg.Connection, dyn_site: SiteServer, ctx: pipeline.Context) -> None:
    wire = process_url(ctx, db, dyn_site.url("pages/dedup/astana6-idlib-wire.html"))
    other = process_url(ctx, db, dyn_site.url("pages/dedup/astana6-detainees.html"))
    assert wire.filed and other.filed
    # Same round, same day, two background paragraphs in common: still two stories.
    assert other.filed.method == "unique"
    assert other.filed.story_id != wire.filed.story_id
    assert db.execute("SELECT count(*) FROM story_digest").fetchone() == (2,)


def test_an_update_2_at_a_new_url_is_linked_as_an_update(
        db: psycopg.Connection, dyn_site: SiteServer, ctx: pipeline.Context) -> None:
    first = process_url(ctx, db, dyn_site.url("pages/dedup/geneve8-ouverture.html"))
    update = process_url(ctx, db, dyn_site.url("pages/dedup/geneve8-ouverture-maj2.html"))
    assert first.filed and update.filed
    assert (update.filed.method, update.filed.matched_article_id) == ("update", first.article_id)
    assert update.filed.story_id == first.filed.story_id
    assert db.execute("SELECT update_of FROM articles WHERE id = %s",
                      (update.article_id,)).fetchone() == (first.article_id,)
    # Labels and round links follow the newest article of the chain.
    assert db.execute("SELECT article_id, latest_id FROM article_latest ORDER BY 1").fetchall() == [
        (first.article_id, update.article_id), (update.article_id, update.article_id)]
    # The update is more complete, so it now represents the story.
    assert members(db, first.filed.story_id)[1][2] is True
    assert changes(db) == ["story_created", "member_added", "representative_changed",
                           "article_updated"]


def test_utm_and_google_news_variants_are_one_article(
        db: psycopg.Connection, dyn_site: SiteServer, ctx: pipeline.Context) -> None:
    page = dyn_site.url("pages/dedup/astana6-idlib-ar.html")
    variants = [
        page,
        page + "?utm_source=twitter&utm_medium=social&utm_campaign=astana6",
        "https://news.google.com/news/url?sa=t&fd=R&ct2=us&usg=AFQjCNE&url="
        + quote(page + "?utm_source=googlenews", safe=":/"),
        f"https://news.google.com/rss/articles/{google_article_id(page + '#comments')}?oc=5",
        # Not a tracker, so only the page's own rel=canonical can tell: fetched, then folded.
        page + "?edition=ar",
    ]
    outcomes = [process_url(ctx, db, url) for url in variants]
    assert [o.outcome for o in outcomes] == ["stored"] + ["duplicate"] * 4
    owner = outcomes[0].article_id
    assert [o.filed.method for o in outcomes if o.filed] == ["unique", "alias", "alias", "alias", "url"]
    assert db.execute("SELECT count(*) FROM articles WHERE state = 'stored'").fetchone() == (1,)
    assert db.execute("SELECT count(*) FROM articles WHERE duplicate_of = %s",
                      (owner,)).fetchone() == (4,)
    aliases = {r[0] for r in db.execute("SELECT url FROM article_aliases WHERE article_id = %s",
                                        (owner,))}
    assert set(variants) <= aliases
    assert db.execute("SELECT canonical_url, version FROM articles WHERE id = %s",
                      (owner,)).fetchone() == (page, 1)


def test_the_same_url_refetched_with_changed_text_is_a_new_version(
        db: psycopg.Connection, dyn_site: SiteServer, ctx: pipeline.Context) -> None:
    DYNAMIC["dyn/1.html"] = ("genf8-live-v1.html", None)
    first = process_url(ctx, db, dyn_site.url("dyn/1.html"))
    assert first.outcome == "stored"
    assert pipeline.refresh_article(ctx, first.article_id).outcome == "unchanged"

    DYNAMIC["dyn/1.html"] = ("genf8-live-v2.html", None)
    refreshed = pipeline.refresh_article(ctx, first.article_id)
    assert refreshed.outcome == "version" and refreshed.filed and refreshed.filed.version == 2
    rows = db.execute("SELECT version, material, diff_summary, diff->>'paragraphs_added'"
                      " FROM article_versions WHERE article_id = %s ORDER BY version",
                      (first.article_id,)).fetchall()
    assert rows[0] == (1, True, None, None)
    assert rows[1][:2] == (2, True) and rows[1][2].startswith("+1 paragraph, 2 changed")
    assert rows[1][3] == "1"
    title, version, body = db.execute("SELECT title, version, body FROM articles WHERE id = %s",
                                      (first.article_id,)).fetchone()
    assert (title, version) == ("Syrien-Gespräche in Genf: de Mistura trifft beide Seiten getrennt", 2)
    assert "15. Dezember" in body
    assert changes(db) == ["story_created", "article_version"]

    # Reached again through a URL variant the page folds into its canonical: no third version.
    again = process_url(ctx, db, dyn_site.url("dyn/1.html?edition=print"))
    assert again.outcome == "duplicate" and again.filed and again.filed.version == 2


def test_a_bridging_article_merges_stories_and_a_rewrite_splits_one_out(
        db: psycopg.Connection, dyn_site: SiteServer, ctx: pipeline.Context) -> None:
    # Two halves of the wire story share nothing; the full dispatch contains both.
    DYNAMIC["dyn/2.html"] = ("astana6-idlib-wire.html", slice(0, 4))
    DYNAMIC["dyn/3.html"] = ("astana6-idlib-wire.html", slice(4, 8))
    DYNAMIC["dyn/4.html"] = ("astana6-idlib-wire.html", None)
    head = process_url(ctx, db, dyn_site.url("dyn/2.html"))
    tail = process_url(ctx, db, dyn_site.url("dyn/3.html"))
    assert head.filed and tail.filed and head.filed.story_id != tail.filed.story_id
    full = process_url(ctx, db, dyn_site.url("dyn/4.html"))
    assert full.filed and full.filed.method == "update"
    assert full.filed.story_id == head.filed.story_id  # the older story survives
    merged = db.execute("SELECT merged_into, member_count FROM stories WHERE id = %s",
                        (tail.filed.story_id,)).fetchone()
    assert merged == (head.filed.story_id, 0)
    assert db.execute("SELECT count(*) FROM story_members WHERE story_id = %s",
                      (head.filed.story_id,)).fetchone() == (3,)
    assert "story_merged" in changes(db)

    # The full page is rewritten into another story altogether: it leaves, the rest stays.
    DYNAMIC["dyn/4.html"] = ("astana6-detainees.html", None)
    rewritten = pipeline.refresh_article(ctx, full.article_id)
    assert rewritten.filed and rewritten.filed.new_version
    assert rewritten.filed.story_id not in (head.filed.story_id, tail.filed.story_id)
    split = db.execute("SELECT story_id, other_story_id FROM story_changes"
                       " WHERE kind = 'story_split'").fetchall()
    assert split == [(head.filed.story_id, rewritten.filed.story_id)]
    assert db.execute("SELECT member_count FROM stories WHERE id = %s",
                      (head.filed.story_id,)).fetchone() == (2,)


def bands(db: psycopg.Connection, article_id: int) -> int:
    return db.execute("SELECT count(*) FROM article_bands WHERE article_id = %s",
                      (article_id,)).fetchone()[0]


def test_a_story_copied_word_for_word_is_indexed_once_and_still_found(
        db: psycopg.Connection, dyn_site: SiteServer, ctx: pipeline.Context) -> None:
    # Three outlets run the dispatch unchanged; a fourth cuts its last paragraph.
    for n in (1, 2, 3):
        DYNAMIC[f"dyn/{n}.html"] = ("astana6-idlib-wire.html", None)
    DYNAMIC["dyn/4.html"] = ("astana6-idlib-wire.html", slice(0, 7))
    copies = [process_url(ctx, db, dyn_site.url(f"dyn/{n}.html")) for n in (1, 2, 3)]
    assert [c.filed.method for c in copies if c.filed] == ["unique", "exact", "exact"]
    # One text, one set of band rows: under the first copy.
    assert [bands(db, c.article_id) for c in copies] == [32, 0, 0]
    cut = process_url(ctx, db, dyn_site.url("dyn/4.html"))
    assert cut.filed and cut.filed.method == "near"
    assert cut.filed.story_id == copies[0].filed.story_id  # type: ignore[union-attr]
    story = db.execute("SELECT member_count, representative_id FROM stories WHERE id = %s",
                       (cut.filed.story_id,)).fetchone()
    assert story == (4, copies[0].article_id)  # the fuller text, first filed, represents it


def test_when_the_indexed_copy_changes_its_text_the_next_copy_carries_the_bands(
        db: psycopg.Connection, dyn_site: SiteServer, ctx: pipeline.Context) -> None:
    for n in (1, 2, 3):
        DYNAMIC[f"dyn/{n}.html"] = ("astana6-idlib-wire.html", None)
    copies = [process_url(ctx, db, dyn_site.url(f"dyn/{n}.html")) for n in (1, 2, 3)]
    wire_story = copies[0].filed.story_id  # type: ignore[union-attr]
    # The first outlet replaces its page with another story altogether.
    DYNAMIC["dyn/1.html"] = ("astana6-detainees.html", None)
    rewritten = pipeline.refresh_article(ctx, copies[0].article_id)
    assert rewritten.filed and rewritten.filed.new_version
    assert rewritten.filed.story_id != wire_story
    assert [bands(db, c.article_id) for c in copies] == [32, 32, 0]
    # A near copy of the dispatch still finds the outlets that kept it.
    DYNAMIC["dyn/4.html"] = ("astana6-idlib-wire.html", slice(0, 7))
    cut = process_url(ctx, db, dyn_site.url("dyn/4.html"))
    assert cut.filed and cut.filed.method == "near"
    assert cut.filed.story_id == wire_story
    assert cut.filed.matched_article_id == copies[1].article_id
