"""Feed polling state on a real Postgres: claim slots, sightings, the poll log, summaries."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import psycopg

from worker import store
from worker.config import Settings
from worker.types import FeedEntry

NOW = datetime.now(timezone.utc)


def entry(guid: str | None, url: str, title: str = "t", published: datetime | None = None) -> FeedEntry:
    return FeedEntry(guid=guid, url=url, title=title, published=published)


def test_a_rotating_guid_with_the_same_link_is_the_same_entry(db: psycopg.Connection) -> None:
    feed = store.add_feed(db, "http://wire.example/rss")
    first = store.record_sightings(db, feed.id, [entry("id-1", "http://wire.example/a/1")])
    again = store.record_sightings(db, feed.id, [entry("id-1-rotated", "http://wire.example/a/1")])
    assert (first.seen, first.new_entries, len(first.new_article_ids)) == (1, 1, 1)
    assert (again.seen, again.new_entries, again.new_article_ids) == (1, 0, [])
    assert db.execute("SELECT count(*), max(times_seen) FROM entries").fetchone() == (1, 2)
    assert db.execute("SELECT count(*) FROM articles").fetchone() == (1,)


def test_a_stable_guid_whose_link_changes_makes_no_new_article(db: psycopg.Connection) -> None:
    # Publishers that stamp tracking parameters per request change the link, not the GUID.
    feed = store.add_feed(db, "http://wire.example/rss")
    store.record_sightings(db, feed.id, [entry("id-1", "http://wire.example/a/1?ref=rss&t=1")])
    again = store.record_sightings(db, feed.id, [entry("id-1", "http://wire.example/a/1?ref=rss&t=2")])
    assert (again.new_entries, again.new_article_ids) == (0, [])
    assert db.execute("SELECT count(*) FROM articles").fetchone() == (1,)


def test_an_item_repeated_in_one_document_is_recorded_once(db: psycopg.Connection) -> None:
    feed = store.add_feed(db, "http://wire.example/rss")
    items = [entry("g1", "http://wire.example/a/1"), entry("g2", "http://wire.example/a/2"),
             entry("g1", "http://wire.example/a/1"), entry(None, "http://wire.example/a/2"),
             entry("no-link", "")]
    seen = store.record_sightings(db, feed.id, items)
    assert (seen.seen, seen.new_entries, len(seen.new_article_ids)) == (2, 2, 2)


def test_two_feeds_carrying_one_link_share_the_article_and_keep_both_sightings(
        db: psycopg.Connection) -> None:
    a = store.add_feed(db, "http://wire.example/a.rss")
    b = store.add_feed(db, "http://agency.example/b.rss")
    assert len(store.record_sightings(db, a.id, [entry("x", "http://wire.example/a/1")]).new_article_ids) == 1
    second = store.record_sightings(db, b.id, [entry("other-id", "http://wire.example/a/1")])
    # New to feed b (a sighting), not a new article.
    assert (second.new_entries, second.new_article_ids) == (1, [])
    assert db.execute("SELECT count(DISTINCT feed_id), count(DISTINCT article_id) FROM entries"
                      ).fetchone() == (2, 1)


def test_one_poll_per_slot(db: psycopg.Connection) -> None:
    feed = store.add_feed(db, "http://wire.example/rss")
    (claimed,) = store.claim_due_feeds(db, limit=10, lease_seconds=60)
    assert claimed.poll_slot == feed.poll_slot + 1 and claimed.host == "wire.example"
    assert store.begin_feed_poll(db, feed.id, slot=claimed.poll_slot, lease_seconds=60) is not None
    # The same message delivered again finds its slot taken.
    assert store.begin_feed_poll(db, feed.id, slot=claimed.poll_slot, lease_seconds=60) is None
    # A slot-less claim does not steal a live one; an operator's take-over does, and the old
    # slot can no longer record anything.
    assert store.claim_feed(db, feed.id, lease_seconds=60) is None
    taken = store.claim_feed(db, feed.id, lease_seconds=60, take_over=True)
    assert taken is not None and taken.poll_slot == claimed.poll_slot + 1
    assert not store.record_poll_failure(db, feed.id, slot=claimed.poll_slot, reason="timeout",
                                         detail="", status=None, broken=False, retry_in=60)
    assert store.begin_feed_poll(db, feed.id, slot=taken.poll_slot, lease_seconds=60) is not None
    assert store.record_poll_failure(db, feed.id, slot=taken.poll_slot, reason="timeout",
                                     detail="", status=None, broken=False, retry_in=60)


def test_a_deferred_poll_keeps_or_gives_up_its_claim(db: psycopg.Connection) -> None:
    feed = store.add_feed(db, "http://wire.example/rss")
    (claimed,) = store.claim_due_feeds(db, limit=10, lease_seconds=60)
    store.begin_feed_poll(db, feed.id, slot=claimed.poll_slot, lease_seconds=60)
    assert store.defer_feed_poll(db, feed.id, slot=claimed.poll_slot, delay=5, keep_claim=True)
    # The countdown message can start the same slot again.
    assert store.begin_feed_poll(db, feed.id, slot=claimed.poll_slot, lease_seconds=60) is not None
    assert store.defer_feed_poll(db, feed.id, slot=claimed.poll_slot, delay=0, keep_claim=False)
    row = store.get_feed(db, feed.id)
    assert row is not None and row.claimed_at is None
    assert [f.id for f in store.claim_due_feeds(db, limit=10, lease_seconds=60)] == [feed.id]


def test_the_poll_log_keeps_the_newest_rows(db: psycopg.Connection) -> None:
    feed = store.add_feed(db, "http://wire.example/rss")
    for i in range(8):
        store.log_poll(db, feed.id, outcome="polled", http_status=200, reason=None, detail=None,
                       conditional=False, parsed=True, entries=i, new_entries=0, body_bytes=10,
                       duration_ms=1, next_poll_in=900, interval_reason="unchanged", keep=3)
    assert [p.entries for p in store.recent_polls(db, feed.id)] == [7, 6, 5]


def test_a_moved_feed_changes_host_and_a_broken_one_revives(db: psycopg.Connection) -> None:
    feed = store.add_feed(db, "http://old.example/rss")
    db.execute("UPDATE feeds SET status = 'broken' WHERE id = %s", (feed.id,))
    taken = store.claim_feed(db, feed.id, lease_seconds=60)
    assert taken is not None
    store.begin_feed_poll(db, feed.id, slot=taken.poll_slot, lease_seconds=60)
    assert store.record_poll_success(
        db, feed.id, slot=taken.poll_slot, status=200, etag='"v1"', last_modified=None,
        body_hash="h", parsed=True, title="Old", site_url=None, ttl_seconds=None,
        interval_seconds=900, interval_reason="first_poll", next_poll_in=900,
        moved_to="https://New.example/feed.xml", full_fetch=True)
    row = store.get_feed(db, feed.id)
    assert row is not None
    assert (row.status, row.url, row.host, row.etag) == (
        "active", "https://New.example/feed.xml", "new.example", '"v1"')
    assert row.last_full_fetch_at is not None


def test_items_per_day_ignore_the_backlog_a_first_poll_finds(db: psycopg.Connection,
                                                             settings: Settings) -> None:
    feed = store.add_feed(db, "http://wire.example/rss")
    db.execute("UPDATE feeds SET created_at = now() - interval '30 days'")
    store.record_sightings(db, feed.id, [entry(f"old{i}", f"http://wire.example/old/{i}",
                                               published=NOW - timedelta(days=60)) for i in range(20)])
    store.record_sightings(db, feed.id, [entry(f"new{i}", f"http://wire.example/new/{i}",
                                               published=NOW - timedelta(days=1)) for i in range(14)])
    (summary,) = store.summarize_feeds(db)
    assert summary.items_per_day == 2.0


def _succeed(db: psycopg.Connection, feed_id: int, slot: int, next_in: int) -> float:
    """Record a plain 200 for a slot; return seconds from now to the next poll."""
    assert store.record_poll_success(
        db, feed_id, slot=slot, status=200, etag=None, last_modified=None, body_hash="h",
        parsed=True, title=None, site_url=None, ttl_seconds=None, interval_seconds=next_in,
        interval_reason="default", next_poll_in=next_in, moved_to=None, full_fetch=True)
    return db.execute("SELECT extract(epoch FROM next_poll_at - now()) FROM feeds WHERE id = %s",
                      (feed_id,)).fetchone()[0]  # type: ignore[index]


def test_polls_keep_a_fixed_rate_whatever_the_poll_took(db: psycopg.Connection) -> None:
    feed = store.add_feed(db, "http://wire.example/rss", interval_seconds=300)
    (claimed,) = store.claim_due_feeds(db, limit=10, lease_seconds=60)
    # Claimed 40 s ago (a wait for the host, a slow server): the next poll is due 300 s after
    # the claim, not 300 s after the answer, so the feed's rhythm does not drift.
    db.execute("UPDATE feeds SET claimed_at = now() - interval '40 seconds' WHERE id = %s",
               (feed.id,))
    assert 259 <= _succeed(db, feed.id, claimed.poll_slot, 300) <= 261
    # After a very long deferral the next poll still keeps half an interval's distance.
    db.execute("UPDATE feeds SET next_poll_at = now() WHERE id = %s", (feed.id,))
    (again,) = store.claim_due_feeds(db, limit=10, lease_seconds=60)
    db.execute("UPDATE feeds SET claimed_at = now() - interval '280 seconds' WHERE id = %s",
               (feed.id,))
    assert 149 <= _succeed(db, feed.id, again.poll_slot, 300) <= 151
