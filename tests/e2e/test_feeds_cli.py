"""`talkwire feeds ...` as an operator runs it: discovery, OPML, list, show, poll-now."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import FIXTURES, REPO
from tests.e2e.test_cli import talkwire
from worker.celery_app import PROCESS_QUEUE, create_app
from worker.config import Settings
from worker.demo import SiteServer, serve_site
from worker.opml import read_opml


@pytest.fixture()
def news_site(settings: Settings) -> Iterator[SiteServer]:
    """The fixture site, with a feed at /feed for the common-path search."""
    wire = (FIXTURES / "site" / "feeds" / "wire-en.xml").read_bytes()

    def feed(handler, base: str) -> None:  # type: ignore[no-untyped-def]
        body = wire.replace(b"{base}", base.encode())
        handler.send_response(200)
        handler.send_header("Content-Type", "application/rss+xml; charset=utf-8")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    server = serve_site(FIXTURES / "site", routes={"feed": feed})
    yield server
    server.close()
    # `feeds poll` enqueued article tasks that no worker here consumes.
    with create_app(settings).connection_for_write() as conn:
        conn.default_channel.queue_purge(PROCESS_QUEUE)


def test_feeds_add_discovers_feeds_from_a_site(db: psycopg.Connection, news_site: SiteServer,
                                               site: SiteServer) -> None:
    page = talkwire("feeds", "add", news_site.url("discover/index.html"))
    assert page.returncode == 0, page.stderr
    assert "found rss20 (alternate)" in page.stderr and "found atom10 (alternate)" in page.stderr
    assert db.execute("SELECT url, title, source FROM feeds").fetchall() == [
        (news_site.url("feeds/wire-en.xml"), "Levant Wire: Diplomacy", "cli")]

    both = talkwire("feeds", "add", "--all", news_site.url("discover/index.html"))
    assert both.returncode == 0, both.stderr
    assert db.execute("SELECT count(*) FROM feeds").fetchone() == (2,)

    bare = talkwire("feeds", "add", news_site.url("bare/index.html"))
    assert bare.returncode == 0, bare.stderr
    assert "(common_path)" in bare.stderr and news_site.url("feed") in bare.stdout

    # The session's fixture site has no /feed: an article page there leads nowhere.
    nothing = talkwire("feeds", "add", site.url("pages/astana-festival.html"))
    assert nothing.returncode == 1 and "no feed found" in nothing.stderr
    unchecked = talkwire("feeds", "add", "--no-discover", "http://127.0.0.1:9/later.xml")
    assert unchecked.returncode == 0
    assert db.execute("SELECT count(*) FROM feeds").fetchone() == (4,)


def test_opml_import_is_idempotent_and_export_gives_it_back(db: psycopg.Connection, tmp_path) -> None:  # type: ignore[no-untyped-def]
    shipped = REPO / "seeds" / "feeds.opml"
    expected = read_opml(shipped.read_bytes())
    first = talkwire("feeds", "import", str(shipped))
    assert first.returncode == 0, first.stderr
    assert f"imported {len(expected)} feed(s)" in first.stdout and f"{len(expected)} new" in first.stdout
    assert "importing feeds.opml" in first.stderr and "100%" in first.stderr  # the progress bar
    again = talkwire("feeds", "import", str(shipped))
    assert "0 new" in again.stdout
    assert db.execute("SELECT count(*), count(*) FILTER (WHERE source = 'opml') FROM feeds"
                      ).fetchone() == (len(expected), len(expected))
    exported = talkwire("feeds", "export")
    assert exported.returncode == 0
    assert sorted(read_opml(exported.stdout.encode()), key=lambda f: f.url) == sorted(
        expected, key=lambda f: f.url)

    broken = tmp_path / "broken.opml"
    broken.write_text("<opml><body><outline")
    result = talkwire("feeds", "import", str(broken))
    assert result.returncode == 1 and "bad_opml" in result.stderr


def test_poll_now_then_show_and_list(db: psycopg.Connection, news_site: SiteServer) -> None:
    added = talkwire("feeds", "add", "--no-discover", news_site.url("feeds/wire-en.xml"))
    feed_id = added.stdout.split(":", 1)[0].removeprefix("feed ").strip()
    first = talkwire("feeds", "poll", feed_id)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"feed {feed_id}: polled, 3 entries, 3 new article(s)" in first.stdout
    second = talkwire("feeds", "poll", feed_id)  # the site answers If-None-Match with 304
    assert f"feed {feed_id}: not_modified" in second.stdout

    shown = talkwire("feeds", "show", feed_id)
    assert shown.returncode == 0, shown.stderr
    log = [line for line in shown.stdout.splitlines() if "polled" in line or "not_modified" in line]
    assert len(log) == 2 and "304" in log[0] and "200" in log[1]
    assert "feed_ttl" in shown.stdout  # the fixture's <ttl>30</ttl> sets the floor

    listed = talkwire("feeds", "list")
    assert "1 feed(s)" in listed.stdout and "items/day" in listed.stdout
    # <ttl> set 1800 s; the 304 right after was early, so it kept it.
    assert "1800s early" in listed.stdout
    assert talkwire("feeds", "show", "999").returncode == 1
    assert talkwire("feeds", "poll", "999").returncode == 1
