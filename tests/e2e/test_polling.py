"""Feed polling through a real poll worker, Redis, Postgres and a local site that counts requests.

The site decrements its in-flight count before it sends a response, so the count it sees is
always within the worker's own lease window: its peak is a true lower bound on how many
requests the worker had in flight at once.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import feedparser
import psycopg
import pytest
from celery import Celery

from tests.conftest import FIXTURES, SHARED, WorkerProcess, wait_for
from worker import store
from worker.celery_app import POLL_QUEUE, PROCESS_QUEUE, create_app
from worker.config import Settings
from worker.demo import serve_site
from worker.politeness import redis_client

REAL_FEEDS = SHARED / "eval-data" / "feeds_fastfeedparser"
# The poll worker of this module: per-host limits small enough to bind in a test.
LIMIT, SPACING = 3, 0.02
POLL_ENV = {"TALKWIRE_HOST_MAX_CONCURRENT": str(LIMIT), "TALKWIRE_HOST_MIN_SPACING": str(SPACING),
            # 127.0.0.2 is a second local "host" for the 429 test.
            "TALKWIRE_FETCH_ALLOW_NETWORKS": "127.0.0.1/32,127.0.0.2/32"}
HEADLINES = [
    "Astana talks: guarantors meet on ceasefire monitoring",
    "Genève : l'émissaire de l'ONU convoque une nouvelle session",
    "Переговоры в Астане: делегации обсуждают обмен задержанными",
    "Cenevre'de anayasa komitesi yeniden toplanıyor",
    "جولة جديدة من المحادثات في أستانا",
    "Genfer Gespräche: Opposition legt Positionspapier vor",
]

Answer = tuple[int, dict[str, str], bytes]


def rss(items: list[tuple[str, str, datetime]], base: str) -> bytes:
    """An RSS 2.0 document with (guid, path, date) items, headlines cycling through languages."""
    parts = ['<?xml version="1.0" encoding="UTF-8"?>\n<rss version="2.0"><channel>'
             "<title>Test desk</title><link>" + base + "/</link><description>d</description>"]
    for n, (guid, path, when) in enumerate(items):
        parts.append(f"<item><title>{HEADLINES[n % len(HEADLINES)]}</title>"
                     f"<link>{base}{path}</link><guid isPermaLink=\"false\">{guid}</guid>"
                     f"<pubDate>{format_datetime(when)}</pubDate></item>")
    parts.append("</channel></rss>")
    return "".join(parts).encode("utf-8")


class FakeFeed:
    """One feed on the site: its items, whether it sends ETags, and how it misbehaves."""

    def __init__(self, items: int = 3, *, etag: bool = True, prefix: str = "a") -> None:
        start = datetime(2017, 5, 2, 9, 0, tzinfo=timezone.utc)
        self.items = [(f"{prefix}-{i}", f"/{prefix}/{i}.html", start + timedelta(hours=i))
                      for i in range(items)]
        self.etag = etag
        self.stale_304 = False  # answer 304 to any If-None-Match, changed or not
        self.failure: Answer | None = None
        self.base = ""

    def add_item(self) -> None:
        guid, _, when = self.items[-1]
        prefix, n = guid.rsplit("-", 1)
        self.items.append((f"{prefix}-{int(n) + 1}", f"/{prefix}/{int(n) + 1}.html",
                           when + timedelta(hours=1)))

    def __call__(self, headers: dict[str, str]) -> Answer:
        if self.failure is not None:
            return self.failure
        body = rss(self.items, self.base)
        tag = '"' + hashlib.sha1(body).hexdigest()[:12] + '"'
        sent = headers.get("if-none-match")
        if self.etag and sent and (sent == tag or self.stale_304):
            return 304, {"ETag": sent}, b""
        extra = {"ETag": tag} if self.etag else {}
        return 200, {"Content-Type": "application/rss+xml; charset=utf-8", **extra}, body


class Site:
    """A local site whose routes are set per test; it counts and times every request."""

    def __init__(self, root: Path = FIXTURES / "site", host: str = "127.0.0.1",
                 work: float = 0.0) -> None:
        self.routes: dict[str, Callable[[BaseHTTPRequestHandler, str], None]] = {}
        self.hits: Counter[str] = Counter()
        self.requests: list[tuple[str, dict[str, str], float]] = []
        self.in_flight = self.peak = 0
        self.work = work
        self._lock = threading.Lock()
        self.server = serve_site(root, host=host, routes=self.routes)
        self.host = host

    def url(self, path: str) -> str:
        return self.server.url(path)

    def add(self, path: str, answer: Callable[[dict[str, str]], Answer]) -> str:
        """Serve `answer(request headers)` at path; return the path's URL."""
        if isinstance(answer, FakeFeed):
            answer.base = self.server.base_url

        def handle(handler: BaseHTTPRequestHandler, base: str) -> None:
            headers = {k.lower(): v for k, v in handler.headers.items()}
            with self._lock:
                self.hits[path] += 1
                self.requests.append((path, headers, time.monotonic()))
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
            try:
                if self.work:
                    time.sleep(self.work)
                status, extra, body = answer(headers)
            finally:
                with self._lock:
                    self.in_flight -= 1
            handler.send_response(status)
            for name, value in extra.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)

        self.routes[path] = handle
        return self.url(path)

    def close(self) -> None:
        self.server.close()


@pytest.fixture(scope="module")
def poller(run_env: dict[str, str]) -> Iterator[WorkerProcess]:
    """One thread-pool poll worker for the module (no process queue: nothing leaves 127.0.0.1)."""
    proc = WorkerProcess({**run_env, **POLL_ENV}, extra=(
        "worker", "--queues", "poll", "--pool", "threads", "--concurrency", "8"))
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture()
def app(settings: Settings) -> Iterator[Celery]:
    celery = create_app(settings)
    yield celery
    # Polls here enqueue article tasks that no worker in this module consumes; drop them so a
    # later test's process worker does not pick up ids that now name other rows.
    with celery.connection_for_write() as conn:
        conn.default_channel.queue_purge(PROCESS_QUEUE)


@pytest.fixture()
def site() -> Iterator[Site]:
    server = Site()
    yield server
    server.close()


def dispatch(app: Celery) -> None:
    app.send_task("talkwire.dispatch_due_feeds", queue=POLL_QUEUE)


def polls(db: psycopg.Connection, feed_id: int) -> list[store.PollRow]:
    return store.recent_polls(db, feed_id)


def poll_now(db: psycopg.Connection, app: Celery, feed_id: int, count: int) -> None:
    """Make the feed due, dispatch, and wait until its log has `count` polls."""
    db.execute("UPDATE feeds SET next_poll_at = now() WHERE id = %s", (feed_id,))
    dispatch(app)
    wait_for(lambda: len(polls(db, feed_id)) >= count, 30, f"poll {count} of feed {feed_id}")


def test_a_304_stores_nothing_and_costs_no_parse(
        db: psycopg.Connection, site: Site, app: Celery, poller: WorkerProcess) -> None:
    with_etag, without = FakeFeed(3, prefix="e"), FakeFeed(3, etag=False, prefix="n")
    a = store.add_feed(db, site.add("etag.xml", with_etag))
    b = store.add_feed(db, site.add("plain.xml", without))
    dispatch(app)
    wait_for(lambda: len(polls(db, a.id)) == 1 and len(polls(db, b.id)) == 1, 30, "first polls")
    before = db.execute("SELECT entry_key, last_seen_at, times_seen FROM entries ORDER BY 1").fetchall()
    hash_before = db.execute("SELECT id, body_hash FROM feeds ORDER BY id").fetchall()

    poll_now(db, app, a.id, 2)
    poll_now(db, app, b.id, 2)
    latest_a, latest_b = polls(db, a.id)[0], polls(db, b.id)[0]
    assert (latest_a.outcome, latest_a.http_status, latest_a.conditional, latest_a.parsed) == (
        "not_modified", 304, True, False)
    sent = [headers for path, headers, _ in site.requests if path == "etag.xml"]
    assert "if-none-match" not in sent[0] and sent[1]["if-none-match"].startswith('"')
    # A server without validators sent the same bytes: the body hash skipped the parse.
    assert (latest_b.outcome, latest_b.http_status, latest_b.conditional, latest_b.parsed) == (
        "unchanged", 200, False, False)
    assert db.execute("SELECT entry_key, last_seen_at, times_seen FROM entries ORDER BY 1"
                      ).fetchall() == before
    assert db.execute("SELECT id, body_hash FROM feeds ORDER BY id").fetchall() == hash_before
    assert db.execute("SELECT count(*) FROM articles").fetchone() == (6,)
    assert site.hits == Counter({"etag.xml": 2, "plain.xml": 2})


def test_a_stale_304_is_caught_by_the_periodic_unconditional_fetch(
        db: psycopg.Connection, site: Site, app: Celery, poller: WorkerProcess) -> None:
    feed = FakeFeed(2, prefix="s")
    row = store.add_feed(db, site.add("stale.xml", feed))
    dispatch(app)
    wait_for(lambda: len(polls(db, row.id)) == 1, 30, "first poll")
    feed.add_item()
    feed.stale_304 = True  # the server keeps saying 304 although the feed changed
    poll_now(db, app, row.id, 2)
    assert polls(db, row.id)[0].outcome == "not_modified"
    assert db.execute("SELECT count(*) FROM entries").fetchone() == (2,)

    # A day later the unconditional refresh is due: no validators go out, the change is seen.
    db.execute("UPDATE feeds SET last_full_fetch_at = now() - interval '25 hours'")
    poll_now(db, app, row.id, 3)
    assert "if-none-match" not in site.requests[-1][1]
    assert [(p.outcome, p.conditional, p.new_entries) for p in polls(db, row.id)] == [
        ("polled", False, 1), ("not_modified", True, 0), ("polled", False, 2)]
    assert db.execute("SELECT count(*) FROM entries").fetchone() == (3,)


def test_429_with_retry_after_is_obeyed_by_every_feed_on_the_host(
        db: psycopg.Connection, app: Celery, settings: Settings, poller: WorkerProcess) -> None:
    # Its own address, so the penalty on this host cannot touch the other tests' 127.0.0.1.
    site = Site(host="127.0.0.2")
    client = redis_client(settings.redis_url or "")
    try:
        limited, sibling = FakeFeed(2, prefix="l"), FakeFeed(2, prefix="b")
        limited.failure = (429, {"Retry-After": "120"}, b"slow down")
        a = store.add_feed(db, site.add("limited.xml", limited))
        dispatch(app)
        wait_for(lambda: len(polls(db, a.id)) == 1, 30, "the 429")
        row = store.get_feed(db, a.id)
        assert row is not None and row.last_polled_at is not None
        assert (row.status, row.last_status, row.last_reason) == ("active", 429, "http_429")
        assert (row.next_poll_at - row.last_polled_at).total_seconds() >= 120

        # A sibling feed on the same host, and the limited one forced due: neither is sent.
        b = store.add_feed(db, site.add("sibling.xml", sibling))
        db.execute("UPDATE feeds SET next_poll_at = now()")
        dispatch(app)
        wait_for(lambda: db.execute("SELECT count(*) FROM feeds WHERE next_poll_at > now() + "
                                    "interval '60 seconds' AND claimed_at IS NULL").fetchone()[0] == 2,
                 30, "both feeds deferred behind the penalty")
        dispatch(app)
        time.sleep(1.5)
        assert site.hits == Counter({"limited.xml": 1})
        assert polls(db, b.id) == []
    finally:
        for key in client.scan_iter(settings.redis_prefix + "talkwire:host:{127.0.0.2}*"):
            client.delete(key)
        client.close()
        site.close()


def test_a_feed_down_for_a_day_is_polled_again_and_recovers(
        db: psycopg.Connection, site: Site, app: Celery, settings: Settings,
        poller: WorkerProcess) -> None:
    feed = FakeFeed(2, prefix="d")
    row = store.add_feed(db, site.add("down.xml", feed))
    dispatch(app)
    wait_for(lambda: len(polls(db, row.id)) == 1, 30, "first poll")
    feed.failure = (503, {}, b"maintenance")
    poll_now(db, app, row.id, 2)
    # A day of failures, as the row would hold them after an outage.
    db.execute("UPDATE feeds SET consecutive_failures = 40, last_success_at = now() - interval "
               "'1 day', last_polled_at = now() - interval '1 hour'")
    poll_now(db, app, row.id, 3)
    down = store.get_feed(db, row.id)
    assert down is not None and down.last_polled_at is not None
    assert (down.status, down.last_reason, down.consecutive_failures) == ("active", "http_503", 41)
    wait = (down.next_poll_at - down.last_polled_at).total_seconds()
    # Capped backoff (plus jitter), never disabled.
    assert settings.poll_backoff_cap <= wait <= settings.poll_backoff_cap * (1 + settings.poll_jitter) + 1

    feed.failure = None
    for _ in range(3):  # what was published while it was down
        feed.add_item()
    poll_now(db, app, row.id, 4)  # the capped wait has passed
    up = store.get_feed(db, row.id)
    assert up is not None
    assert (up.status, up.last_status, up.last_reason, up.consecutive_failures) == (
        "active", 200, None, 0)
    # Most of what it found is new, but only because it was down: the interval stays.
    assert (up.interval_seconds, up.interval_reason) == (row.interval_seconds, "late")
    assert [(p.outcome, p.new_entries) for p in polls(db, row.id)] == [
        ("polled", 3), ("failed", 0), ("failed", 0), ("polled", 2)]
    assert db.execute("SELECT count(*) FROM entries").fetchone() == (5,)


def test_500_feeds_on_one_host_never_exceed_the_per_host_limit(
        db: psycopg.Connection, app: Celery, poller: WorkerProcess) -> None:
    site = Site(work=0.02)  # every answer takes 20 ms, so requests would overlap freely
    try:
        for i in range(500):
            store.add_feed(db, site.add(f"busy/{i}.xml", FakeFeed(1, prefix=f"busy{i}")))
        dispatch(app)
        wait_for(lambda: db.execute("SELECT count(*) FROM feeds WHERE last_success_at IS NOT NULL"
                                    ).fetchone()[0] == 500, 120, "all 500 feeds polled")
        assert len(site.hits) == 500 and set(site.hits.values()) == {1}
        assert 1 < site.peak <= LIMIT
        # Starts are spaced: places in a host's queue are one spacing apart, and no grant
        # comes within half a spacing of the one before, so no second of arrivals can hold
        # more than 1.1 s / 10 ms of them; unspaced, three 20 ms requests at a time make 150.
        starts = sorted(t for _, _, t in site.requests)
        busiest = max(sum(1 for t in starts[i:] if t < s + 1.0) for i, s in enumerate(starts))
        assert busiest <= 1.1 / (SPACING / 2)
    finally:
        site.close()


def test_two_beats_claim_each_feed_once(
        db: psycopg.Connection, site: Site, app: Celery, settings: Settings,
        run_env: dict[str, str], poller: WorkerProcess, tmp_path: Path) -> None:
    ids = [store.add_feed(db, site.add(f"beat/{i}.xml", FakeFeed(1, prefix=f"beat{i}"))).id
           for i in range(100)]
    # Redelivery: the first 20 claims are sent twice, as Redis would after a lost ack.
    db.execute("UPDATE feeds SET next_poll_at = now() + interval '1 hour' WHERE id > %s",
               (ids[19],))
    claimed = store.claim_due_feeds(db, limit=100, lease_seconds=settings.lease_seconds)
    assert len(claimed) == 20
    for feed in claimed + claimed:
        app.send_task("talkwire.poll_feed", args=[feed.id, feed.poll_slot], queue=POLL_QUEUE)
    db.execute("UPDATE feeds SET next_poll_at = now() WHERE id > %s", (ids[19],))
    beats = [WorkerProcess({**run_env, "TALKWIRE_DATA_DIR": str(tmp_path / f"beat{n}")},
                           extra=("beat",)) for n in range(2)]
    try:
        wait_for(lambda: db.execute("SELECT count(*) FROM feeds WHERE last_success_at IS NOT NULL"
                                    ).fetchone()[0] == 100, 90, "all 100 feeds polled")
        time.sleep(3)  # three more ticks of each beat
        assert all("beat: Starting" in b.output() for b in beats)
    finally:
        for beat in beats:
            beat.stop()
    assert len(site.hits) == 100 and set(site.hits.values()) == {1}
    assert db.execute("SELECT count(*), count(DISTINCT feed_id) FROM feed_polls").fetchone() == (100, 100)


def test_moves_and_hard_errors(db: psycopg.Connection, site: Site, app: Celery,
                               poller: WorkerProcess) -> None:
    site.add("new/one.xml", FakeFeed(1, prefix="m1"))
    site.add("new/two.xml", FakeFeed(1, prefix="m2"))
    moved = store.add_feed(db, site.add("old/one.xml", lambda h: (
        301, {"Location": site.url("new/one.xml")}, b"")))
    moved8 = store.add_feed(db, site.add("old/two.xml", lambda h: (
        308, {"Location": "/new/two.xml"}, b"")))
    gone = store.add_feed(db, site.add("gone.xml", lambda h: (410, {}, b"gone")))
    html = b"<!doctype html><html><head><title>Maintenance</title></head><body>Back soon</body></html>"
    never = store.add_feed(db, site.add("page.html", lambda h: (
        200, {"Content-Type": "text/html"}, html)))
    outage = FakeFeed(1, prefix="o")
    worked = store.add_feed(db, site.add("worked.xml", outage))
    dispatch(app)
    wait_for(lambda: db.execute("SELECT count(*) FROM feed_polls").fetchone()[0] == 5, 30, "5 polls")
    outage.failure = (200, {"Content-Type": "text/html"}, html)  # an outage page, served as 200
    poll_now(db, app, worked.id, 2)

    rows = {r[0]: r[1:] for r in db.execute(
        "SELECT id, url, status, last_reason FROM feeds").fetchall()}
    assert rows[moved.id] == (site.url("new/one.xml"), "active", None)
    assert rows[moved8.id] == (site.url("new/two.xml"), "active", None)
    assert rows[gone.id][1:] == ("broken", "http_410")
    assert rows[never.id][1:] == ("broken", "not_a_feed")
    # A feed that parsed before and now serves a page is in an outage, not gone.
    assert rows[worked.id][1:] == ("active", "not_a_feed")
    assert polls(db, moved.id)[0].detail == f"moved to {site.url('new/one.xml')}"


def served_counts(db: psycopg.Connection, app: Celery, urls: dict[str, str]) -> dict[str, tuple[int, int]]:
    """Poll the given feeds once; per name: (entries in the document, distinct entries stored)."""
    ids = {name: store.add_feed(db, url).id for name, url in urls.items()}
    dispatch(app)
    wait_for(lambda: db.execute("SELECT count(*) FROM feed_polls").fetchone()[0] == len(ids),
             60, f"{len(ids)} polls")
    result = {}
    for name, feed_id in ids.items():
        (latest,) = polls(db, feed_id)
        assert latest.outcome == "polled", (name, latest)
        stored = db.execute("SELECT count(*) FROM entries WHERE feed_id = %s", (feed_id,)).fetchone()
        result[name] = (latest.entries, stored[0])
    return result


def distinct_items(parsed: feedparser.FeedParserDict) -> int:
    return len({e.get("id") or e.get("link") for e in parsed.entries})


@pytest.mark.skipif(not REAL_FEEDS.is_dir(), reason="../shared/eval-data is absent")
def test_real_feeds_yield_what_feedparser_finds(db: psycopg.Connection, app: Celery,
                                                poller: WorkerProcess) -> None:
    server = serve_site(REAL_FEEDS)
    try:
        files = sorted(REAL_FEEDS.glob("*.xml"))
        assert len(files) == 20
        got = served_counts(db, app, {p.name: server.url(p.name) for p in files})
    finally:
        server.close()
    expected = {}
    for p in files:
        parsed = feedparser.parse(p.read_bytes())
        expected[p.name] = (len(parsed.entries), distinct_items(parsed))
    assert got == expected
    assert sum(n for n, _ in got.values()) == 610


def test_own_fixture_formats_poll_like_feedparser_reads_them(
        db: psycopg.Connection, site: Site, app: Celery, poller: WorkerProcess) -> None:
    formats = FIXTURES / "site" / "feeds" / "formats"
    cp1251 = (formats / "cp1251-ru.xml").read_bytes().replace(
        b"{base}", site.server.base_url.encode())
    site.add("feeds/formats/cp1251-ru.xml", lambda h: (
        200, {"Content-Type": "application/rss+xml; charset=windows-1251"}, cp1251))
    names = sorted(p.name for p in formats.iterdir())
    got = served_counts(db, app, {n: site.url("feeds/formats/" + n) for n in names})
    expected = {}
    for n in names:
        body = (formats / n).read_bytes()
        if n.endswith(".json"):
            import json

            count = len(json.loads(body)["items"])
            expected[n] = (count, count)
        else:
            parsed = feedparser.parse(body)
            expected[n] = (len(parsed.entries), distinct_items(parsed))
    assert got == expected
    titles = {r[0] for r in db.execute("SELECT title FROM entries").fetchall()}
    assert "Лаврентьев: следующая встреча в Астане пройдёт в сентябре" in titles
    assert "وفد المعارضة يصل إلى أستانا قبيل الجولة الرابعة" in titles
