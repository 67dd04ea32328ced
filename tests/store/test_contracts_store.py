"""The change feed and the consumer views on real Postgres (issue 7)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import errors

from tests.conftest import wait_for
from worker import store
from worker.config import Settings

VIEWS = ("articles", "feeds", "sightings", "changes", "submissions", "dead_letters")


@pytest.fixture()
def clean(db: psycopg.Connection) -> psycopg.Connection:
    db.execute("TRUNCATE dead_letters, changes, submissions RESTART IDENTITY")
    return db


@pytest.fixture()
def listener(settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.database_url or "", autocommit=True) as conn:
        store.listen_changes(conn)
        yield conn


def notified_ids(conn: psycopg.Connection, count: int) -> list[int]:
    ids = [int(n.payload) for n in conn.notifies(timeout=10, stop_after=count)]
    assert len(ids) == count, f"got {ids}"
    return ids


def test_a_change_is_notified_on_commit_and_never_on_rollback(
        clean: psycopg.Connection, settings: Settings, listener: psycopg.Connection) -> None:
    with psycopg.connect(settings.database_url or "") as conn:
        with conn.transaction():
            first = store.append_change(conn, "article_created", "article", 1, {"url": "u1"})
        with pytest.raises(RuntimeError), conn.transaction():
            store.append_change(conn, "article_created", "article", 2, {})
            raise RuntimeError("roll back")
        with conn.transaction():
            third = store.append_change(conn, "round_created", "round", 9, {"name": "Astana 4"})
    assert notified_ids(listener, 2) == [first, third]
    rows = store.list_changes(clean, since=0, limit=10)
    assert [(r.id, r.event, r.entity_id, r.payload) for r in rows] == [
        (first, "article_created", 1, {"url": "u1"}), (third, "round_created", 9,
                                                       {"name": "Astana 4"})]
    assert store.list_changes(clean, since=first, limit=10)[0].id == third


def test_ids_become_visible_in_increasing_order_even_when_writers_overlap(
        clean: psycopg.Connection, settings: Settings, listener: psycopg.Connection) -> None:
    # Writer A appends first and commits last. With a bare bigserial, B's larger id would be
    # visible before A's, and a consumer resuming after B's id would lose A's change.
    url = settings.database_url or ""
    with psycopg.connect(url) as a, psycopg.connect(url) as b:
        a_id = store.append_change(a, "article_created", "article", 1, {})
        b_pid = b.info.backend_pid
        b_result: list[int] = []
        writer_b = threading.Thread(target=lambda: (
            b_result.append(store.append_change(b, "article_created", "article", 2, {})),
            b.commit()))
        writer_b.start()
        # B must be waiting on A's lock (not merely slow) before A commits.
        wait_for(lambda: clean.execute(
            "SELECT count(*) FROM pg_locks WHERE pid = %s AND locktype = 'advisory'"
            " AND NOT granted", (b_pid,)).fetchone() == (1,), 10, "B to wait for A")
        assert store.list_changes(clean, since=0, limit=10) == []
        a.commit()
        writer_b.join(timeout=10)
    assert b_result[0] > a_id
    assert notified_ids(listener, 2) == [a_id, b_result[0]]


def test_changes_held_to_the_end_of_a_filing_take_the_lock_only_there(
        clean: psycopg.Connection, settings: Settings, listener: psycopg.Connection) -> None:
    def advisory_locks(pid: int) -> int:
        row = clean.execute("SELECT count(*) FROM pg_locks WHERE pid = %s"
                            " AND locktype = 'advisory'", (pid,)).fetchone()
        return int(row[0]) if row else 0

    with psycopg.connect(settings.database_url or "") as conn:
        pid = conn.info.backend_pid
        with conn.transaction():
            with store.changes_last(conn):
                assert store.append_change(conn, "story_merged", "story", 5, {"n": 1}) is None
                store.append_change(conn, "round_link_changed", "article", 7, {"n": 2})
                # Held: nothing written yet, and other writers are not kept waiting.
                assert advisory_locks(pid) == 0
                assert store.list_changes(clean, since=0, limit=10) == []
            assert advisory_locks(pid) == 1
        with pytest.raises(RuntimeError), conn.transaction(), store.changes_last(conn):
            store.append_change(conn, "article_created", "article", 8, {})
            raise RuntimeError("a failed filing writes no change")
    rows = store.list_changes(clean, since=0, limit=10)
    assert [(r.event, r.entity_id, r.payload) for r in rows] == [
        ("story_merged", 5, {"n": 1}), ("round_link_changed", 7, {"n": 2})]
    assert rows[0].id < rows[1].id
    assert notified_ids(listener, 2) == [r.id for r in rows]


def test_the_change_feed_is_append_only(clean: psycopg.Connection) -> None:
    change_id = store.append_change(clean, "story_merged", "story", 3, {"into": 2})
    with pytest.raises(errors.RaiseException, match="append-only"):
        clean.execute("UPDATE changes SET event = 'round_updated' WHERE id = %s", (change_id,))
    with pytest.raises(errors.CheckViolation):
        store.append_change(clean, "article_deleted", "article", 3, {})


@pytest.fixture()
def as_reader(settings: Settings) -> Iterator[psycopg.Connection]:
    """A connection acting as talkwire_reader (SET ROLE drops the superuser's rights)."""
    with psycopg.connect(settings.database_url or "") as conn:
        conn.execute("SET ROLE talkwire_reader")
        yield conn


def test_the_reader_role_reads_the_views(clean: psycopg.Connection,
                                         as_reader: psycopg.Connection) -> None:
    article_id, _ = store.add_article_url(clean, "https://wire.example/a", origin="cli")
    clean.execute("UPDATE articles SET state = 'stored', title = 'T', body = 'B' WHERE id = %s",
                  (article_id,))
    store.add_article_url(clean, "https://wire.example/pending", origin="cli")
    store.append_change(clean, "article_created", "article", article_id, {})
    for view in VIEWS:
        as_reader.execute(psycopg.sql.SQL("SELECT * FROM talkwire_v1.{} LIMIT 1").format(
            psycopg.sql.Identifier(view)))
    # Only stored articles are part of the API; pending work is internal.
    assert as_reader.execute("SELECT id, title, text FROM talkwire_v1.articles").fetchall() == [
        (article_id, "T", "B")]
    assert as_reader.execute("SELECT event FROM talkwire_v1.changes").fetchall() == [
        ("article_created",)]


@pytest.mark.parametrize("statement", [
    "SELECT * FROM articles",
    "SELECT * FROM public.changes",
    "SELECT payload FROM dead_letters",
    "SELECT * FROM submissions",
    "INSERT INTO talkwire_v1.articles (url) VALUES ('https://wire.example/x')",
    "UPDATE talkwire_v1.feeds SET title = 'x'",
    "DELETE FROM talkwire_v1.changes",
    "INSERT INTO changes (event, entity, entity_id) VALUES ('round_created', 'round', 1)",
    "CREATE VIEW talkwire_v1.mine AS SELECT 1",
])
def test_the_reader_role_is_refused_on_internal_tables_and_on_writes(
        clean: psycopg.Connection, as_reader: psycopg.Connection, statement: str) -> None:
    with pytest.raises(errors.InsufficientPrivilege):
        as_reader.execute(statement)
