"""The store on a real Postgres: idempotent writes and safe claims."""

from __future__ import annotations

import threading

import psycopg

from tests.conftest import wait_for
from worker import pipeline, store
from worker.demo import SiteServer
from worker.types import FeedEntry


def entries(*urls: str) -> list[FeedEntry]:
    return [FeedEntry(guid=f"g-{u}", url=u, title=f"title {u}", published=None) for u in urls]


def test_recording_the_same_entries_twice_creates_nothing_new(db: psycopg.Connection) -> None:
    feed = store.add_feed(db, "http://news.example/feed.xml")
    first = store.record_entries(db, feed.id, entries("http://a/1", "http://a/2"))
    again = store.record_entries(db, feed.id, entries("http://a/1", "http://a/2"))
    assert len(first) == 2 and again == []
    assert db.execute("SELECT count(*) FROM articles").fetchone() == (2,)
    assert db.execute("SELECT count(*) FROM entries").fetchone() == (2,)


def test_the_same_article_in_two_feeds_is_one_article_with_two_sightings(db: psycopg.Connection) -> None:
    a = store.add_feed(db, "http://news.example/a.xml")
    b = store.add_feed(db, "http://news.example/b.xml")
    assert len(store.record_entries(db, a.id, entries("http://a/1"))) == 1
    assert store.record_entries(db, b.id, entries("http://a/1")) == []
    assert db.execute("SELECT count(DISTINCT feed_id), count(DISTINCT article_id) FROM entries").fetchone() == (2, 1)


def test_two_claimers_never_get_the_same_feed(db: psycopg.Connection, settings) -> None:
    for i in range(20):
        store.add_feed(db, f"http://news.example/{i}.xml")
    with psycopg.connect(settings.database_url) as one, psycopg.connect(settings.database_url) as two:
        first = store.claim_due_feeds(one, limit=15, lease_seconds=60)  # transaction still open
        second = store.claim_due_feeds(two, limit=15, lease_seconds=60)
        one.commit()
        two.commit()
    ids_one, ids_two = {f.id for f in first}, {f.id for f in second}
    assert len(ids_one) == 15 and len(ids_two) == 5 and not ids_one & ids_two
    # Claimed feeds are leased: nothing is due until the lease runs out.
    assert store.claim_due_feeds(db, limit=100, lease_seconds=60) == []


def test_lease_admits_one_worker_at_a_time(db: psycopg.Connection) -> None:
    article_id, created = store.add_article_url(db, "http://a/1", origin="cli")
    assert created and store.add_article_url(db, "http://a/1", origin="cli") == (article_id, False)
    assert store.lease_article(db, article_id, lease_seconds=60) is not None
    assert store.lease_article(db, article_id, lease_seconds=60) is None


def test_a_lease_reads_one_row_after_a_burst_of_pending_articles(
        db: psycopg.Connection) -> None:
    # A worker's connection prepares the lease, and Postgres caches a generic plan for it
    # while few articles are pending. That plan must still find one article by its id when
    # an import or a backfill has queued tens of thousands, not read every pending one.
    early = [store.add_article_url(db, f"http://a/early/{n}", origin="cli")[0] for n in range(12)]
    for article_id in early:  # psycopg prepares after 5; Postgres goes generic after 5 more
        assert store.lease_article(db, article_id, lease_seconds=60) is not None
    db.execute("INSERT INTO articles (url, origin, enqueued_at) SELECT 'http://a/burst/' || g,"
               " 'cli', now() FROM generate_series(1, 20000) AS g")
    last = db.execute("SELECT max(id) FROM articles").fetchone()[0]
    name = db.execute("SELECT name FROM pg_prepared_statements"
                      " WHERE statement LIKE 'UPDATE articles SET leased_until%'").fetchone()[0]
    with db.transaction(force_rollback=True):  # EXPLAIN ANALYZE really leases it
        plan = db.execute(f'EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE "{name}" (60, {last})'
                          ).fetchone()[0][0]["Plan"]
    assert plan["Plans"][0]["Actual Rows"] == 1  # the scan under the UPDATE found the article
    blocks = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
    assert blocks < 50, plan  # one row through an index; the burst spans hundreds of pages


def test_sweeper_picks_only_stale_pending_work(db: psycopg.Connection) -> None:
    fresh, _ = store.add_article_url(db, "http://a/fresh", origin="cli")
    stale, _ = store.add_article_url(db, "http://a/stale", origin="cli")
    leased, _ = store.add_article_url(db, "http://a/leased", origin="cli")
    db.execute("UPDATE articles SET enqueued_at = now() - interval '1 hour' WHERE id IN (%s, %s)",
               (stale, leased))
    store.lease_article(db, leased, lease_seconds=600)
    assert store.sweep_stale_articles(db, stale_seconds=60, limit=10) == [stale]
    # Just resent, so not stale again.
    assert store.sweep_stale_articles(db, stale_seconds=60, limit=10) == []
    assert fresh not in store.sweep_stale_articles(db, stale_seconds=60, limit=10)


def test_a_store_cut_off_by_the_database_gives_its_lease_back(
        db: psycopg.Connection, site: SiteServer, ctx: pipeline.Context) -> None:
    article_id, _ = store.add_article_url(db, site.url("pages/astana4-arrival.html"),
                                          origin="cli")
    failure: list[BaseException] = []

    def process() -> None:
        try:
            pipeline.process_article(ctx, article_id)
        except psycopg.OperationalError as exc:
            failure.append(exc)

    with psycopg.connect(db.info.dsn) as holder:
        # Hold a table only the storing transaction writes, so that it waits there.
        holder.execute("LOCK TABLE article_versions IN EXCLUSIVE MODE")
        worker = threading.Thread(target=process)
        worker.start()
        waiting: list[int] = []

        def storing_waits() -> bool:
            waiting[:] = [r[0] for r in db.execute(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%%INSERT INTO article_versions%%'")]
            return bool(waiting)

        wait_for(storing_waits, 30, "the storing transaction to wait on the row")
        # What a Postgres restart or a failover does to the connection in use.
        db.execute("SELECT pg_terminate_backend(%s)", (waiting[0],))
        worker.join(30)
    assert failure, "the task must see the database error, to retry"
    row = db.execute("SELECT state, leased_until, fail_reason FROM articles WHERE id = %s",
                     (article_id,)).fetchone()
    assert row == ("pending", None, "database_error")
    # The retry takes the lease at once, rather than when the lease would have run out.
    assert pipeline.process_article(ctx, article_id).outcome == "stored"
