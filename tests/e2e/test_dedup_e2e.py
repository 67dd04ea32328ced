"""One dispatch carried by three outlets, through a real feed, Redis, worker and Postgres."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
from celery import Celery

from tests.conftest import WorkerProcess, wait_for
from worker import store
from worker.celery_app import create_app
from worker.config import Settings
from worker.demo import SiteServer


def test_three_outlets_of_one_wire_story_become_one_story_with_three_members(
        db: psycopg.Connection, site: SiteServer, settings: Settings,
        start_worker: Callable[..., WorkerProcess]) -> None:
    app: Celery = create_app(settings)
    store.add_feed(db, site.url("feeds/dedup-outlets.xml"))
    # Two processes take the four articles at once: the dedup locks must still file the
    # three copies together whichever finishes first.
    start_worker(concurrency=2).wait_ready()
    app.send_task("talkwire.dispatch_due_feeds")
    wait_for(lambda: db.execute("SELECT count(*) FROM articles WHERE state = 'stored'")
             .fetchone()[0] == 4, 60, "four articles stored")

    stories = db.execute(
        "SELECT member_count, outlets FROM story_digest ORDER BY member_count DESC").fetchall()
    assert stories == [(3, ["Gulf Courier", "Levant Wire", "The Mediterranean Post"]),
                       (1, ["Gulf Courier"])]
    rows = db.execute(
        "SELECT m.headline, m.url, d.method FROM story_members m"
        " JOIN dedup_decisions d ON d.article_id = m.article_id"
        " JOIN stories s ON s.id = m.story_id WHERE s.member_count = 3 ORDER BY m.headline").fetchall()
    assert [r[0] for r in rows] == ["Guarantors agree on Idlib monitors as Astana talks close",
                                    "Idlib monitors deal completes Syria de-escalation map",
                                    "Russia, Iran and Turkey to police Idlib zone"]
    # The Courier came through the feed with utm_* parameters; its URL is the canonical one.
    assert site.url("pages/dedup/astana6-idlib-courier.html") in [r[1] for r in rows]
    # Whichever came first is 'unique'; the other two joined it as near copies.
    assert sorted(r[2] for r in rows) == ["near", "near", "unique"]
    # Every feed sighting still points at its own outlet's article.
    assert db.execute("SELECT count(DISTINCT article_id) FROM entries").fetchone() == (4,)
