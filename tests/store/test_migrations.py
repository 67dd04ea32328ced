"""Migrations apply to an empty database, once, even when two processes race."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import with_database
from worker import store


@pytest.fixture()
def empty_db(servers: tuple[str, str]) -> Iterator[str]:
    admin_url = servers[0]
    name = f"talkwire_mig_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    yield with_database(admin_url, name)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP DATABASE {} WITH (FORCE)").format(psycopg.sql.Identifier(name)))


def test_migrations_build_the_schema_on_an_empty_database(empty_db: str) -> None:
    files = sorted(p.stem for p in store.MIGRATIONS_DIR.glob("[0-9]*.sql"))
    with psycopg.connect(empty_db) as conn:
        assert store.apply_migrations(conn) == files
        tables = {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
        assert {"feeds", "articles", "entries", "schema_migrations"} <= tables
        # A second run finds nothing to do.
        assert store.apply_migrations(conn) == []


def test_concurrent_migrations_apply_each_file_once(empty_db: str) -> None:
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            with psycopg.connect(empty_db) as conn:
                results.append(store.apply_migrations(conn))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    applied = [name for result in results for name in result]
    assert sorted(applied) == sorted(p.stem for p in store.MIGRATIONS_DIR.glob("[0-9]*.sql"))


def test_article_texts_are_compressed_with_lz4_where_the_server_has_it(empty_db: str) -> None:
    with psycopg.connect(empty_db, autocommit=True) as conn:
        store.apply_migrations(conn)
        try:
            conn.execute("CREATE TEMP TABLE probe (b text COMPRESSION lz4)")
            expected = "lz4"
        except psycopg.errors.FeatureNotSupported:
            expected = "pglz"  # a build without lz4: the migration leaves the default
        body = "Les garants se sont entendus sur quatre zones de désescalade. " * 60
        article_id = conn.execute("INSERT INTO articles (url, state, body) VALUES (%s, 'stored', %s)"
                                  " RETURNING id", ("https://example.org/a", body)).fetchone()[0]
        conn.execute("INSERT INTO article_versions (article_id, version, body, content_hash,"
                     " fingerprint, fetched_by, material) VALUES (%s, 1, %s, 'h', 'f', %s, true)",
                     (article_id, body, article_id))
        stored = conn.execute(
            "SELECT pg_column_compression(a.body), pg_column_compression(v.body)"
            " FROM articles a JOIN article_versions v ON v.article_id = a.id").fetchone()
        assert stored == (expected, expected)
