"""Concurrency (issue 8, case 14): two beats, two pollers on one feed, and one story through
two feeds at once, each done exactly once, through real beat, poll and process workers.

"Once" is what a consumer sees: one article row per URL, one stored article, an entry for
every feed that listed it, and one article_created event in the change feed. The feeds are
served by the polling tests' counting site (tests/e2e/test_polling.py) and list the team's
fixture pages.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
from celery import Celery

from tests.conftest import WorkerProcess, wait_for
from tests.e2e.test_polling import Site, rss
from tests.faults.conftest import count_states, peak_rss_mb
from tests.faults.test_worker_faults import last_change, stored_once
from worker import store
from worker.celery_app import POLL_QUEUE, create_app
from worker.config import Settings

PAGES = ("astana4-arrival.html", "astana6-tr.html", "geneve6-cloture.html",
         "sochi-congress-ru.html")
FIRST_ITEM = datetime(2017, 5, 2, 9, 0, tzinfo=timezone.utc)
RECEIVED = re.compile(r"talkwire\.poll_feeds?\[[^]]+\] received")


@pytest.fixture()
def app(settings: Settings) -> Celery:
    return create_app(settings)


@pytest.fixture()
def feed_site() -> Iterator[Site]:
    """The counting site; every feed answer takes 0.5 s, so polls sent together overlap."""
    server = Site(work=0.5)
    yield server
    server.close()


def serve_feed(site: Site, path: str, pages: Sequence[str], guid_prefix: str) -> str:
    """Serve an RSS feed at path whose items link to fixture pages; return its URL."""
    items = [(f"{guid_prefix}-{n}", f"/pages/{page}", FIRST_ITEM + timedelta(hours=n))
             for n, page in enumerate(pages)]
    body = rss(items, site.server.base_url)
    return site.add(path, lambda headers: (
        200, {"Content-Type": "application/rss+xml; charset=utf-8"}, body))


def start_pollers(spawn: Callable[..., WorkerProcess], count: int) -> list[WorkerProcess]:
    """Poll workers of one thread each: each holds one message at a time, so two messages
    sent together go to two workers."""
    pollers = [spawn(extra=("worker", "--queues", "poll", "--pool", "threads",
                            "--concurrency", "1")) for _ in range(count)]
    for poller in pollers:
        poller.wait_ready()
    return pollers


def start_processor(spawn: Callable[..., WorkerProcess]) -> WorkerProcess:
    """One prefork worker on the process queue."""
    worker = spawn(queues="process", concurrency=2)
    worker.wait_ready()
    return worker


def assert_each_article_once(db: psycopg.Connection, since_change: int, count: int) -> None:
    """One row per URL, each stored, and each created once in the change feed."""
    assert db.execute("SELECT count(*), count(DISTINCT url) FROM articles").fetchone() == (
        count, count)
    assert count_states(db) == {"stored": count}
    assert stored_once(db, since_change) == (count, count)


def test_two_beats_at_once_poll_each_feed_and_store_each_article_once(
        db: psycopg.Connection, feed_site: Site, spawn: Callable[..., WorkerProcess],
        tmp_path: Path, record: Callable[..., None]) -> None:
    feeds = [store.add_feed(db, serve_feed(feed_site, f"beats/{n}.xml", [page], f"beats{n}")).id
             for n, page in enumerate(PAGES)]
    start_pollers(spawn, 1)
    processor = start_processor(spawn)
    before = last_change(db)
    # Both beats start together over feeds that are all due; each has its own schedule file.
    beats = [spawn({"TALKWIRE_DATA_DIR": str(tmp_path / f"beat{n}")}, extra=("beat",))
             for n in range(2)]
    started = time.monotonic()
    wait_for(lambda: count_states(db) == {"stored": len(PAGES)}, 60, "every article stored")
    done = time.monotonic() - started
    time.sleep(3)  # three more ticks of each beat, and of each sweeper
    assert all("beat: Starting" in beat.output() for beat in beats)
    assert feed_site.hits == {f"beats/{n}.xml": 1 for n in range(len(PAGES))}
    assert db.execute("SELECT count(*), count(DISTINCT feed_id) FROM feed_polls").fetchone() == (
        len(feeds), len(feeds))
    assert_each_article_once(db, before, len(PAGES))
    assert db.execute("SELECT count(*) FROM entries").fetchone() == (len(PAGES),)
    record("14 two beats at once over the same feeds", "each feed polled once; stored once",
           expected=len(PAGES), stored=len(PAGES), recover_s=done,
           peak_mb=peak_rss_mb(processor))


def test_two_pollers_on_one_feed_at_the_same_moment_poll_it_once(
        db: psycopg.Connection, feed_site: Site, app: Celery, settings: Settings,
        spawn: Callable[..., WorkerProcess], record: Callable[..., None]) -> None:
    pages = PAGES[:3]
    feed = store.add_feed(db, serve_feed(feed_site, "twice.xml", pages, "twice"))
    pollers = start_pollers(spawn, 2)
    processor = start_processor(spawn)
    before = last_change(db)
    # One claim, its poll sent twice at once (a redelivery racing the original).
    [claim] = store.claim_due_feeds(db, limit=10, lease_seconds=settings.lease_seconds)
    started = time.monotonic()
    for _ in range(2):
        app.send_task("talkwire.poll_feed", args=[claim.id, claim.poll_slot], queue=POLL_QUEUE)
    wait_for(lambda: all(RECEIVED.search(p.output()) for p in pollers), 30,
             "each poller to take one of the two messages")
    wait_for(lambda: count_states(db) == {"stored": len(pages)}, 60, "every article stored")
    done = time.monotonic() - started
    # One of the two polled the feed; the other found its slot taken and stood down.
    assert feed_site.hits == {"twice.xml": 1}
    assert sum('"msg": "poll stale"' in p.output() for p in pollers) == 1
    assert db.execute("SELECT count(*) FROM feed_polls WHERE feed_id = %s",
                      (feed.id,)).fetchone() == (1,)
    assert_each_article_once(db, before, len(pages))
    assert db.execute("SELECT count(*) FROM entries").fetchone() == (len(pages),)
    record("14 two pollers on one feed at once (poll sent twice)", "polled once; stored once",
           expected=len(pages), stored=len(pages), recover_s=done,
           peak_mb=peak_rss_mb(processor))


def test_the_same_story_in_two_feeds_polled_at_once_is_stored_once(
        db: psycopg.Connection, feed_site: Site, app: Celery, settings: Settings,
        spawn: Callable[..., WorkerProcess], record: Callable[..., None]) -> None:
    shared = "geneve6-cloture.html"
    # Each feed lists the shared story (under its own guid) beside a story of its own.
    east = store.add_feed(db, serve_feed(feed_site, "east.xml", [shared, PAGES[0]], "east"))
    west = store.add_feed(db, serve_feed(feed_site, "west.xml", [shared, PAGES[1]], "west"))
    pollers = start_pollers(spawn, 2)
    processor = start_processor(spawn)
    before = last_change(db)
    claims = store.claim_due_feeds(db, limit=10, lease_seconds=settings.lease_seconds)
    assert sorted(c.id for c in claims) == [east.id, west.id]
    started = time.monotonic()
    for claim in claims:
        app.send_task("talkwire.poll_feed", args=[claim.id, claim.poll_slot], queue=POLL_QUEUE)
    wait_for(lambda: count_states(db) == {"stored": 3}, 60, "the three stories stored")
    done = time.monotonic() - started
    # The two polls ran side by side, one on each poller.
    assert all(RECEIVED.search(p.output()) for p in pollers)
    assert feed_site.hits == {"east.xml": 1, "west.xml": 1} and feed_site.peak == 2
    assert_each_article_once(db, before, 3)
    [(story_id,)] = db.execute("SELECT id FROM articles WHERE url = %s",
                               (feed_site.url(f"pages/{shared}"),)).fetchall()
    # Both feeds' entries point at the one article.
    assert db.execute("SELECT feed_id FROM entries WHERE article_id = %s ORDER BY feed_id",
                      (story_id,)).fetchall() == [(east.id,), (west.id,)]
    record("14 same story in two feeds polled at once", "one article, two entries",
           expected=3, stored=3, recover_s=done, peak_mb=peak_rss_mb(processor))
