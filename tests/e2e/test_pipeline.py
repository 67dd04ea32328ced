"""Feed to stored article through a real Celery worker, Redis, Postgres and HTTP site."""

from __future__ import annotations

import re
from collections.abc import Callable

import psycopg
import pytest
from celery import Celery

from tests.conftest import WorkerProcess, wait_for
from worker import store
from worker.celery_app import create_app
from worker.config import Settings
from worker.demo import SiteServer


@pytest.fixture()
def app(settings: Settings) -> Celery:
    return create_app(settings)


def stored_count(db: psycopg.Connection) -> int:
    return db.execute("SELECT count(*) FROM articles WHERE state <> 'pending'").fetchone()[0]


def dispatch(app: Celery) -> None:
    # The same task beat sends on its schedule.
    app.send_task("talkwire.dispatch_due_feeds")


def test_feed_to_stored_articles_and_a_repoll_stores_nothing_twice(
        db: psycopg.Connection, site: SiteServer, app: Celery,
        start_worker: Callable[..., WorkerProcess]) -> None:
    store.add_feed(db, site.url("feeds/wire-en.xml"))
    store.add_feed(db, site.url("feeds/depeches-fr.atom"))
    worker = start_worker()
    worker.wait_ready()
    dispatch(app)
    wait_for(lambda: stored_count(db) == 4, 60, "four articles stored")

    rows = db.execute(
        "SELECT url, state, title, author, language, published_at::date::text, length(body) "
        "FROM articles ORDER BY url").fetchall()
    by_url = {r[0].removeprefix(site.base_url): r[1:] for r in rows}
    assert by_url["/pages/astana4-arrival.html"][:5] == (
        "stored", "Opposition team lands in Astana ahead of fourth round", "Lena Hartmann",
        "en", "2017-05-02")
    assert by_url["/pages/geneve6-cloture.html"][3] == "fr"
    assert all(r[1] == "stored" and r[6] > 200 for r in rows)
    feeds = db.execute("SELECT last_status, last_reason, claimed_at FROM feeds").fetchall()
    assert feeds == [(200, None, None), (200, None, None)]

    # Poll both feeds again: the entries are sightings we already have.
    db.execute("UPDATE feeds SET next_poll_at = now()")
    dispatch(app)
    wait_for(lambda: db.execute("SELECT count(*) FROM feeds WHERE claimed_at IS NULL "
                                "AND last_polled_at > last_success_at - interval '1 second' "
                                "AND next_poll_at > now()").fetchone()[0] == 2,
             30, "second poll of both feeds")
    assert db.execute("SELECT count(*) FROM articles").fetchone()[0] == 4
    assert db.execute("SELECT count(*) FROM entries").fetchone()[0] == 4
    # A poll's new articles went TALKWIRE_PROCESS_BATCH to a message, not one each.
    assert re.search(r"talkwire\.process_articles\[[^]]+\] received", worker.output())


def test_a_redirect_to_the_metadata_address_is_refused_and_recorded(
        db: psycopg.Connection, site: SiteServer, app: Celery,
        start_worker: Callable[..., WorkerProcess]) -> None:
    store.add_feed(db, site.url("feeds/hostile.xml"))
    start_worker().wait_ready()
    dispatch(app)
    wait_for(lambda: stored_count(db) == 2, 60, "both entries to finish")
    rows = dict(db.execute("SELECT url, fail_reason FROM articles").fetchall())
    assert rows[site.url("redirect-to-metadata")] == "blocked_address"
    # The good article beside it went through.
    assert rows[site.url("pages/astana-festival.html")] is None
    assert db.execute("SELECT attempts FROM articles WHERE fail_reason = 'blocked_address'").fetchone() == (1,)


def test_an_unreachable_feed_records_its_reason_and_backs_off(
        db: psycopg.Connection, app: Celery, start_worker: Callable[..., WorkerProcess]) -> None:
    # Port 9 on loopback (discard) has no listener here: connection refused.
    store.add_feed(db, "http://127.0.0.1:9/feed.xml")
    store.add_feed(db, "file:///etc/passwd")
    start_worker().wait_ready()
    dispatch(app)
    wait_for(lambda: db.execute("SELECT count(*) FROM feeds WHERE last_reason IS NOT NULL")
             .fetchone()[0] == 2, 30, "both feeds to fail")
    rows = {r[0]: r[1:] for r in db.execute(
        "SELECT url, status, last_reason, consecutive_failures, next_poll_at > now() FROM feeds")}
    assert rows["http://127.0.0.1:9/feed.xml"] == ("active", "connect_error", 1, True)
    assert rows["file:///etc/passwd"] == ("broken", "blocked_scheme", 1, True)


def test_a_killed_worker_loses_no_article(
        db: psycopg.Connection, site: SiteServer, app: Celery,
        start_worker: Callable[..., WorkerProcess]) -> None:
    urls = [site.url(f"slow/{i}.html") for i in range(4)]
    for url in urls:
        store.add_article_url(db, url, origin="cli")
    first = start_worker(concurrency=2)
    first.wait_ready()
    for (article_id,) in db.execute("SELECT id FROM articles").fetchall():
        app.send_task("talkwire.process_article", args=[article_id])
    wait_for(lambda: db.execute("SELECT count(*) FROM articles WHERE leased_until IS NOT NULL")
             .fetchone()[0] >= 1, 30, "a worker to take an article")
    first.kill()  # SIGKILL to the whole process group, mid-fetch
    assert stored_count(db) < 4

    # A new worker and beat (whose sweeper resends work whose lease ran out) finish the job.
    start_worker(concurrency=2).wait_ready()
    start_worker(extra=("beat",))
    wait_for(lambda: stored_count(db) == 4, 90, "all four articles after the kill")
    rows = db.execute("SELECT url, state FROM articles ORDER BY id").fetchall()
    assert rows == [(url, "stored") for url in urls]


def test_a_batch_message_processes_each_article_and_sends_a_failing_one_on_alone(
        db: psycopg.Connection, site: SiteServer, app: Celery,
        start_worker: Callable[..., WorkerProcess]) -> None:
    # Port 9 on loopback (discard) has no listener: a connect_error, retried alone, then
    # given up.
    closed = "http://127.0.0.1:9/story.html"
    urls = [site.url("pages/astana4-arrival.html"), closed, site.url("pages/no-such-page.html"),
            site.url("pages/geneve6-cloture.html")]
    ids = [store.add_article_url(db, url, origin="cli")[0] for url in urls]
    worker = start_worker()
    worker.wait_ready()
    app.send_task("talkwire.process_articles", args=[ids])
    app.send_task("talkwire.process_articles", args=[["not an id", ids[0]]])
    wait_for(lambda: stored_count(db) == 4, 60, "every article of the batch to finish")

    rows = db.execute("SELECT url, state, fail_reason, fail_detail FROM articles ORDER BY id"
                      ).fetchall()
    assert [r[:3] for r in rows] == [(urls[0], "stored", None), (closed, "failed", "connect_error"),
                                     (urls[2], "failed", "http_404"), (urls[3], "stored", None)]
    assert rows[1][3].startswith("gave up after retries")
    log = worker.output()
    # One message for the four; the unreachable one went on alone for each of its retries
    # (TALKWIRE_MAX_RETRIES=2), and the malformed batch was refused without harm.
    assert len(re.findall(r"talkwire\.process_articles\[[^]]+\] received", log)) == 2
    assert len(re.findall(r"talkwire\.process_article\[[^]]+\] received", log)) == 2
    assert '"reason": "malformed_message"' in log
    assert db.execute("SELECT count(*) FROM articles").fetchone() == (4,)
