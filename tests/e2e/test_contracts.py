"""Producer and consumer contracts (issue 7), through real workers, Redis, Postgres and HTTP.

Producers here are separate processes that never import talkwire: a plain Celery client, a
kombu client and a plain redis client (the runnable examples in docs/examples). The change
feed is followed by the docs' LISTEN consumer, connected as the read-only role.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from celery import Celery
from kombu import Connection
from psycopg.conninfo import make_conninfo

from tests.conftest import FIXTURES, REPO, WorkerProcess, wait_for
from tests.e2e.test_cli import talkwire
from worker import pipeline
from worker.celery_app import create_app
from worker.config import Settings
from worker.contracts import InvalidMessage
from worker.demo import SiteServer
from worker.intake import resolve_stream_key
from worker.politeness import redis_client
from worker.producer import submit_document, submit_url

EXAMPLES = REPO / "docs" / "examples"
# Run an example as __main__ and then prove it never imported talkwire's package.
NO_TALKWIRE = ("import runpy, sys; path = sys.argv.pop(1); sys.argv[0] = path;"
               " runpy.run_path(path, run_name='__main__');"
               " leaked = [m for m in sys.modules if m == 'worker' or m.startswith('worker.')];"
               " assert not leaked, leaked")


@pytest.fixture(scope="module")
def services(run_env: dict[str, str]) -> Iterator[dict[str, WorkerProcess]]:
    """One worker on every queue and one stream intake, shared by this module's tests."""
    env = {**run_env, "TALKWIRE_INTAKE_CLAIM_IDLE": "2"}
    procs = {
        "worker": WorkerProcess(env, queues="poll,process,intake", concurrency=2),
        "intake": WorkerProcess(env, extra=("intake",)),
    }
    procs["worker"].wait_ready()
    wait_for(lambda: "intake: consuming" in procs["intake"].output(), 60, "the intake to start")
    yield procs
    for proc in procs.values():
        proc.stop()


@pytest.fixture()
def clean(db: psycopg.Connection) -> psycopg.Connection:
    """The emptied database, with the contract tables emptied too."""
    db.execute("TRUNCATE dead_letters, changes, submissions RESTART IDENTITY")
    return db


@pytest.fixture()
def app(settings: Settings) -> Celery:
    return create_app(settings)


@pytest.fixture()
def rstream(settings: Settings) -> Iterator[tuple[redis.Redis, str]]:
    client = redis_client(settings.redis_url or "")
    yield client, resolve_stream_key(settings)
    client.close()


def run_example(name: str, *args: str, env: dict[str, str], cwd: Path) -> str:
    """Run docs/examples/NAME in a fresh interpreter outside the repo; return its stdout."""
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", NO_TALKWIRE, str(EXAMPLES / name), *args],
                            env={**clean_env, **env}, cwd=cwd, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def producer_env(settings: Settings) -> dict[str, str]:
    url = settings.redis_url or ""
    return {"REDIS_URL": url, "TALKWIRE_REDIS_PREFIX": settings.redis_prefix}


def redis_py_env(settings: Settings) -> dict[str, str]:
    # The embedded Redis listens on a unix socket; kombu spells that redis+socket://, redis-py
    # unix://. A deployment's redis:// URL is the same for both.
    env = producer_env(settings)
    env["REDIS_URL"] = env["REDIS_URL"].replace("redis+socket://", "unix://")
    return env


def one(db: psycopg.Connection, query: str, *params: object) -> object:
    row = db.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def counts(db: psycopg.Connection) -> tuple[int, int, int]:
    """How many articles, submissions and changes there are."""
    row = db.execute("SELECT (SELECT count(*) FROM articles), (SELECT count(*) FROM submissions),"
                     " (SELECT count(*) FROM changes)").fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def stored_urls(db: psycopg.Connection) -> set[str]:
    return {r[0] for r in db.execute("SELECT url FROM articles WHERE state = 'stored'")}


def test_producers_without_talkwire_store_articles_and_resends_store_nothing_new(
        clean: psycopg.Connection, site: SiteServer, settings: Settings,
        services: dict[str, WorkerProcess], tmp_path: Path) -> None:
    db = clean
    celery_url = site.url("pages/sochi-congress-ru.html")
    kombu_url = site.url("pages/astana4-memorandum.html")
    stream_url = site.url("pages/astana6-tr.html")
    run_example("send_with_celery.py", celery_url, env=producer_env(settings), cwd=tmp_path)
    run_example("send_with_kombu.py", kombu_url, env=producer_env(settings), cwd=tmp_path)
    run_example("send_with_redis.py", stream_url, env=redis_py_env(settings), cwd=tmp_path)
    wait_for(lambda: stored_urls(db) == {celery_url, kombu_url, stream_url}, 60,
             "three producer articles stored")

    rows = {r[0]: r[1:] for r in db.execute(
        "SELECT s.producer, s.via, a.origin, a.language, a.site_name, a.published_at::date::text"
        " FROM submissions s JOIN articles a ON a.id = s.article_id")}
    assert rows["example-celery"] == ("celery", "producer", "ru", "Южный вестник", "2018-01-30")
    assert rows["example-kombu"][:2] == ("celery", "producer")
    # The Turkish page carries no date: the producer's hint fills the gap (and only the gap).
    assert rows["example-stream"] == ("stream", "producer", "tr", "Boğaz Haber", "2017-09-15")
    created = db.execute("SELECT event, entity_id FROM changes ORDER BY id").fetchall()
    # Each story is noted once; talks stories also announce the round links they got.
    assert [e for e, _ in created if e == "article_created"] == ["article_created"] * 3
    assert {e for e, _ in created} <= {"article_created", "round_link_changed"}

    # Resend both with the same (default) idempotency key: only the duplicate counts move.
    before = counts(db)
    run_example("send_with_celery.py", celery_url, env=producer_env(settings), cwd=tmp_path)
    run_example("send_with_redis.py", stream_url, env=redis_py_env(settings), cwd=tmp_path)
    wait_for(lambda: one(db, "SELECT count(*) FROM submissions WHERE duplicates = 1") == 2, 60,
             "both resends to be seen")
    assert counts(db) == before and before[:2] == (3, 3)
    assert one(db, "SELECT count(*) FROM dead_letters") == 0

    # The same key for a different message is key reuse: the first message stands, the
    # second is kept as a dead letter for a person to look at.
    key = one(db, "SELECT idempotency_key FROM submissions WHERE producer = 'example-celery'")
    run_example("send_with_celery.py", site.url("pages/geneve6-cloture.html"), str(key),
                env=producer_env(settings), cwd=tmp_path)
    wait_for(lambda: one(db, "SELECT count(*) FROM dead_letters") == 1, 60, "the key reuse")
    assert db.execute("SELECT reason, producer FROM dead_letters").fetchall() == [
        ("idempotency_conflict", "example-celery")]
    assert one(db, "SELECT count(*) FROM articles") == 3


def test_the_redis_cli_example_from_the_docs_works(
        clean: psycopg.Connection, site: SiteServer, settings: Settings,
        services: dict[str, WorkerProcess]) -> None:
    if not shutil.which("redis-cli"):
        pytest.skip("redis-cli is not installed")
    url = settings.redis_url or ""
    target = (["-s", url.removeprefix("redis+socket://")] if url.startswith("redis+socket://")
              else ["-u", url])
    message = json.dumps({"type": "ingest_url", "version": 1, "producer": "desk-cli",
                          "url": site.url("pages/geneve6-cloture.html")})
    # docs/producers.md: redis-cli XADD talkwire:intake '*' message '{...}'
    subprocess.run(["redis-cli", *target, "XADD", resolve_stream_key(settings), "*", "message", message],
                   check=True, capture_output=True, timeout=30)
    wait_for(lambda: stored_urls(clean) == {site.url("pages/geneve6-cloture.html")}, 60,
             "the redis-cli article stored")


def ingest_document_message(url: str, *, producer: str, **extra: object) -> dict[str, object]:
    html = (FIXTURES / "documents" / "geneva4-ar.html").read_text(encoding="utf-8")
    return {"type": "ingest_document", "version": 1, "producer": producer, "url": url,
            "document": {"content": html}, **extra}


def test_bad_messages_become_dead_letters_while_good_ones_around_them_go_through(
        clean: psycopg.Connection, settings: Settings, app: Celery,
        rstream: tuple[redis.Redis, str], services: dict[str, WorkerProcess]) -> None:
    db = clean
    client, stream = rstream
    german = (FIXTURES / "documents" / "astana5-de.txt").read_text(encoding="utf-8")

    def good(n: int) -> dict[str, object]:
        return ingest_document_message(f"https://mashreq.example/geneva4/{n}",
                                       producer="desk-stream")

    ten_mb = ingest_document_message("https://mashreq.example/huge", producer="desk-stream",
                                     hints={"language": "ar"})
    ten_mb["document"] = {"content": "<p>" + "Astana " * (1536 * 1024) + "</p>"}  # 10.5 MB
    plain_text = {"type": "ingest_document", "version": 1, "producer": "desk-stream",
                  "url": "https://wire.example/de/astana5",
                  "document": {"content": german, "content_type": "text/plain",
                               "title": "Astana: fünfte Runde ohne Einigung"}}
    stream_entries: list[tuple[str, bytes]] = [
        ("good", json.dumps(good(1)).encode()),
        ("missing_field", json.dumps({"type": "ingest_url", "version": 1,
                                      "producer": "desk-stream"}).encode()),
        ("wrong_type", json.dumps({"type": "ingest_url", "version": 1, "producer": "desk-stream",
                                   "url": ["https://wire.example/a"]}).encode()),
        ("unknown_version", json.dumps({"type": "ingest_url", "version": 3,
                                        "producer": "desk-stream",
                                        "url": "https://wire.example/b"}).encode()),
        ("too_large", json.dumps(ten_mb, ensure_ascii=False).encode()),
        ("not_json", b"type=ingest_url&producer=desk-stream&url=https://wire.example/c"),
        ("good", json.dumps(plain_text, ensure_ascii=False).encode()),
    ]
    for _, payload in stream_entries:
        client.xadd(stream, {"message": payload})
    # The same cases through Celery: send_task by name, and a raw body that is not JSON.
    app.send_task("talkwire.ingest_url", args=[{"version": 1, "producer": "desk-celery"}],
                  queue="intake")
    app.send_task("talkwire.ingest_url", args=[{"version": 1, "producer": "desk-celery",
                                                "url": "https://wire.example/d",
                                                "hints": {"language": 7}}], queue="intake")
    app.send_task("talkwire.ingest_document", args=[{**good(2), "version": 2}], queue="intake")
    app.send_task("talkwire.ingest_document", args=[{**ten_mb, "producer": "desk-celery"}],
                  queue="intake")
    not_json_id = str(uuid.uuid4())
    options = {"global_keyprefix": settings.redis_prefix} if settings.redis_prefix else {}
    with Connection(settings.redis_url, transport_options=options) as conn:
        conn.Producer().publish(
            b'{"version": 1, "producer": "desk-celery", "url": "https://wire.example/e"',
            exchange="", routing_key="intake", content_type="application/json",
            content_encoding="utf-8", headers={"task": "talkwire.ingest_url", "id": not_json_id})
    app.send_task("talkwire.ingest_document", args=[good(3)], queue="intake")

    wait_for(lambda: one(db, "SELECT count(*) FROM dead_letters") == 10
             and len(stored_urls(db)) == 3, 90, "ten dead letters and three stored documents")
    letters = db.execute("SELECT via, producer, reason, detail, payload_size, payload_truncated,"
                         " length(payload) FROM dead_letters").fetchall()
    by_case = {(via, reason): (producer, detail, size, truncated, kept)
               for via, producer, reason, detail, size, truncated, kept in letters}
    assert sorted(by_case) == sorted([
        ("stream", "missing_field"), ("stream", "wrong_type"), ("stream", "unknown_version"),
        ("stream", "too_large"), ("stream", "not_json"),
        ("celery", "missing_field"), ("celery", "wrong_type"), ("celery", "unknown_version"),
        ("celery", "too_large"), ("celery", "not_json")])
    assert by_case[("stream", "missing_field")][1] == "$: 'url' is a required property"
    assert by_case[("stream", "wrong_type")][1].startswith("$.url: ['https://wire.example/a']")
    assert by_case[("celery", "wrong_type")][1] == "$.hints.language: 7 is not of type 'string'"
    assert by_case[("stream", "unknown_version")][1] == (
        "ingest_url version 3; this talkwire knows v1")
    assert by_case[("celery", "unknown_version")][1] == (
        "ingest_document version 2; this talkwire knows v1")
    assert by_case[("celery", "not_json")][0] == "desk-celery"  # read from the raw head
    for via in ("stream", "celery"):
        producer, detail, size, truncated, kept = by_case[(via, "too_large")]
        assert producer == f"desk-{via}"
        assert size > 10 * 1024 * 1024 and truncated and kept == 65536
        assert detail.endswith("bytes; the limit is 2097152")
    # The small ones keep their whole payload, byte for byte.
    kept_raw = one(db, "SELECT payload FROM dead_letters WHERE via = 'stream'"
                       " AND reason = 'not_json'")
    assert bytes(kept_raw) == stream_entries[5][1]  # type: ignore[arg-type]

    stored = dict(db.execute("SELECT url, language FROM articles WHERE state = 'stored'")
                  .fetchall())
    assert stored == {"https://mashreq.example/geneva4/1": "ar",
                      "https://wire.example/de/astana5": None,
                      "https://mashreq.example/geneva4/3": "ar"}
    # Nothing crashed and nothing was retried: the rejections are outcomes.
    assert all(proc.proc.poll() is None for proc in services.values())
    assert " retry:" not in services["worker"].output()
    assert client.xlen(stream) == 0  # every entry acknowledged and deleted


def test_a_dead_consumers_pending_entry_is_claimed_and_nothing_is_lost(
        clean: psycopg.Connection, settings: Settings, rstream: tuple[redis.Redis, str],
        services: dict[str, WorkerProcess]) -> None:
    client, stream = rstream
    # A consumer that read an entry and died before acknowledging it. XADD and its read run
    # in one MULTI, so the running intake (blocked in XREADGROUP) cannot take it first.
    with client.pipeline(transaction=True) as pipe:
        pipe.xadd(stream, {"message": json.dumps(ingest_document_message(
            "https://mashreq.example/geneva4/claimed", producer="desk-stream"))})
        pipe.xreadgroup(settings.intake_group, "crashed-consumer", {stream: ">"}, count=1)
        taken = pipe.execute()[1]
    assert taken and len(taken[0][1]) == 1
    assert client.xpending(stream, settings.intake_group)["consumers"] == [
        {"name": b"crashed-consumer", "pending": 1}]
    wait_for(lambda: stored_urls(clean) == {"https://mashreq.example/geneva4/claimed"}, 60,
             "the abandoned entry to be claimed and stored")
    assert client.xpending(stream, settings.intake_group)["pending"] == 0


def test_the_python_helper_validates_before_sending(
        clean: psycopg.Connection, app: Celery, services: dict[str, WorkerProcess]) -> None:
    sent = submit_document("https://wire.example/de/astana5-helper",
                           (FIXTURES / "documents" / "astana5-de.txt").read_text(encoding="utf-8"),
                           producer="desk-python", content_type="text/plain",
                           title="Astana: fünfte Runde ohne Einigung", language="de",
                           published_at="2017-07-05", app=app)
    assert sent.idempotency_key == "https://wire.example/de/astana5-helper"
    wait_for(lambda: len(stored_urls(clean)) == 1, 60, "the helper's document stored")
    assert clean.execute("SELECT title, language, published_at::date::text FROM articles"
                         ).fetchone() == ("Astana: fünfte Runde ohne Einigung", "de", "2017-07-05")
    with pytest.raises(InvalidMessage) as caught:
        submit_url("ftp://wire.example/a", producer="desk-python", app=app)
    assert caught.value.reason == "invalid_value"


def reader_url(settings: Settings) -> str:
    """The run's database as the read-only role (libpq sets the role at connection start)."""
    return make_conninfo(settings.database_url or "", options="-c role=talkwire_reader")


def test_a_listen_consumer_gets_every_change_in_order_across_disconnects(
        clean: psycopg.Connection, settings: Settings, tmp_path: Path) -> None:
    db = clean
    ctx = pipeline.open_context(settings)
    produced = iter(range(1, 100))

    def produce(count: int) -> None:
        for _ in range(count):
            n = next(produced)
            outcome = pipeline.accept_message(ctx, ingest_document_message(
                f"https://mashreq.example/geneva4/{n}", producer="desk-feed"),
                kind=None, via="stream", source_ref=None)
            assert outcome.outcome == "stored"

    state = tmp_path / "last-id.txt"
    log = tmp_path / "follower.out"

    def start_follower() -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return subprocess.Popen(
            [sys.executable, "-c", NO_TALKWIRE, str(EXAMPLES / "follow_changes.py"), str(state)],
            env={**env, "TALKWIRE_READER_URL": reader_url(settings)}, cwd=tmp_path,
            stdout=log.open("ab"), stderr=(tmp_path / "follower.err").open("ab"),
            start_new_session=True)

    def seen() -> list[int]:
        return [json.loads(line)["id"] for line in log.read_text().splitlines()]

    def total() -> int:
        return db.execute("SELECT count(*) FROM changes").fetchone()[0]

    follower = start_follower()
    try:
        produce(3)  # before the consumer is up: caught up by id
        wait_for(lambda: len(seen()) == total(), 30, "the first changes")
        produce(2)  # it LISTENs before it catches up, so these wake it (NOTIFY)
        wait_for(lambda: len(seen()) == total(), 30, "notified changes")

        # A disconnect: the server drops the consumer's connection; it reconnects, catches up.
        dropped = db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             " WHERE application_name = 'follow_changes'"
                             " AND datname = current_database()").fetchall()
        assert dropped == [(True,)]
        produce(3)
        wait_for(lambda: len(seen()) == total(), 30, "the changes made while it was disconnected")

        # A restart: the process dies; the new one resumes from the id in its state file.
        os.killpg(follower.pid, signal.SIGKILL)
        follower.wait()
        produce(2)
        follower = start_follower()
        wait_for(lambda: len(seen()) == total(), 30, "the changes made while it was down")
    finally:
        if follower.poll() is None:
            os.killpg(follower.pid, signal.SIGKILL)
            follower.wait()
        ctx.close()
    ids = [r[0] for r in db.execute("SELECT id FROM changes ORDER BY id")]
    assert seen() == ids  # every change, once, in order
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    # Ten copies of one document: the first creates its story; each later copy is a
    # duplicate that the story absorbs, and the consumer sees that as story_merged.
    assert events.count("article_created") == 10
    assert events.count("story_merged") == 9


def test_talkwire_changes_prints_and_follows_the_feed(
        clean: psycopg.Connection, settings: Settings) -> None:
    ctx = pipeline.open_context(settings)
    try:
        first = pipeline.accept_message(ctx, ingest_document_message(
            "https://mashreq.example/geneva4/cli-1", producer="desk-cli"),
            kind=None, via="stream", source_ref=None)
        printed = subprocess.run([sys.executable, "-m", "worker.cli", "changes", "--since", "0"],
                                 cwd=REPO, capture_output=True, text=True, timeout=60)
        assert printed.returncode == 0, printed.stderr
        printed_changes = [json.loads(line) for line in printed.stdout.splitlines()]
        change = next(c for c in printed_changes if c["event"] == "article_created")
        assert (change["entity"], change["entity_id"]) == ("article", first.article_id)
        follow = subprocess.Popen([sys.executable, "-m", "worker.cli", "changes", "--follow",
                                   "--since", str(printed_changes[-1]["id"])], cwd=REPO,
                                  stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            second = pipeline.accept_message(ctx, ingest_document_message(
                "https://mashreq.example/geneva4/cli-2", producer="desk-cli"),
                kind=None, via="stream", source_ref=None)
            assert follow.stdout is not None
            # The copy is absorbed by the first one's story, linked to its round, and noted
            # as created, in that order.
            followed = [json.loads(follow.stdout.readline()) for _ in range(3)]
            assert [c["event"] for c in followed] == ["story_merged", "round_link_changed",
                                                      "article_created"]
            assert followed[0]["id"] > printed_changes[-1]["id"]
            assert followed[2]["entity_id"] == second.article_id
        finally:
            os.killpg(follow.pid, signal.SIGTERM)
            follow.wait(timeout=20)
    finally:
        ctx.close()


def test_dead_letters_list_show_and_replay_from_the_command_line(
        clean: psycopg.Connection, settings: Settings) -> None:
    ctx = pipeline.open_context(settings)
    html = (FIXTURES / "documents" / "geneva4-ar.html").read_text(encoding="utf-8")
    # Three megabytes: above the 2 MiB limit, below the 4 MiB a dead letter keeps whole.
    big = ingest_document_message("https://mashreq.example/geneva4/long", producer="desk-ops")
    big["document"] = {"content": html.replace("</article>", "<!--" + "-" * 3_000_000 + "-->"
                                               "</article>")}
    try:
        too_large = pipeline.accept_message(ctx, json.dumps(big), kind=None, via="stream",
                                            source_ref="1-1")
        not_json = pipeline.accept_message(ctx, "{oops", kind=None, via="stream",
                                           source_ref="1-2")
    finally:
        ctx.close()
    assert (too_large.reason, not_json.reason) == ("too_large", "not_json")

    listed = talkwire("dead-letters", "list")
    assert "2 dead letter(s)" in listed.stdout
    assert "too_large" in listed.stdout and "not_json" in listed.stdout
    shown = talkwire("dead-letters", "show", str(not_json.dead_letter_id))
    assert "reason: not_json" in shown.stdout and "{oops" in shown.stdout

    still_bad = talkwire("dead-letters", "replay", str(too_large.dead_letter_id))
    assert still_bad.returncode == 1 and "rejected again: too_large" in still_bad.stdout
    # Raise the limit, replay: the document is stored and the dead letter says so.
    replayed = talkwire("dead-letters", "replay", str(too_large.dead_letter_id),
                        env={"TALKWIRE_MESSAGE_MAX_BYTES": str(4 * 1024 * 1024)})
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert f"{too_large.dead_letter_id}: stored" in replayed.stdout
    assert stored_urls(clean) == {"https://mashreq.example/geneva4/long"}
    assert one(clean, "SELECT replay_outcome FROM dead_letters WHERE id = %s",
               too_large.dead_letter_id) .startswith("stored (article ")


def test_a_dead_letter_is_recorded_whatever_the_message_carries(
        clean: psycopg.Connection, settings: Settings) -> None:
    # Text columns refuse NUL, and a raw Celery header can be any JSON value: neither may stop
    # the rejection from being recorded.
    ctx = pipeline.open_context(settings)
    try:
        outcome = pipeline.accept_message(
            ctx, {"version": 1, "producer": "desk\x00x", "url": 5}, kind="ingest_url",
            via="celery", source_ref={"id": ["not", "a", "string"]})  # type: ignore[arg-type]
    finally:
        ctx.close()
    assert outcome.outcome == "dead_letter"
    assert clean.execute("SELECT producer, reason, source_ref FROM dead_letters").fetchall() == [
        ("desk\\x00x", "wrong_type", "{'id': ['not', 'a', 'string']}")]


def test_the_intake_survives_its_stream_being_deleted(
        clean: psycopg.Connection, rstream: tuple[redis.Redis, str],
        services: dict[str, WorkerProcess]) -> None:
    client, stream = rstream
    client.delete(stream)  # what FLUSHALL does to it: the group goes too
    wait_for(lambda: client.exists(stream) == 1, 30, "the intake to make its group again")
    client.xadd(stream, {"message": json.dumps(ingest_document_message(
        "https://mashreq.example/geneva4/after-flush", producer="desk-stream"))})
    wait_for(lambda: stored_urls(clean) == {"https://mashreq.example/geneva4/after-flush"}, 60,
             "an entry sent after the flush to be stored")
    assert services["intake"].proc.poll() is None


def test_backfill_loads_an_archive_file_and_loading_it_again_adds_nothing(
        clean: psycopg.Connection, site: SiteServer, services: dict[str, WorkerProcess],
        tmp_path: Path) -> None:
    db = clean
    memorandum = site.url("pages/astana4-memorandum.html")
    closing = site.url("pages/geneve6-cloture.html")
    undated = site.url("pages/astana6-tr.html")
    document = ingest_document_message("https://mashreq.example/archive/geneva4",
                                       producer="archive-desk")
    archive = tmp_path / "talks-archive.txt"
    lines = [
        "# what the desk kept of the Astana and Geneva rounds",  # after a byte order mark
        memorandum,
        "",
        closing,
        json.dumps({"type": "ingest_url", "version": 1, "producer": "archive-desk",
                    "url": undated, "hints": {"published_at": "2017-09-15"}}),
        json.dumps(document, ensure_ascii=False),
        "ftp://archive.example/astana4.html",  # line 7: not an http(s) URL
        '{"type": "ingest_url", "version": 1,',  # line 8: cut-off JSON
        memorandum + "?utm_source=archive",  # line 9: the same article, another spelling
    ]
    archive.write_bytes("\r\n".join(lines).encode("utf-8-sig")
                        + b"\r\nhttps://archive.example/caf\xe9\r\n")  # line 10: Latin-1

    first = talkwire("backfill", str(archive))
    assert first.returncode == 0, first.stderr
    assert "backfill of talks-archive.txt: 3 article(s) queued for the workers" in first.stdout
    assert outcome_counts(first.stdout) == {
        "queued": 3, "stored": 1, "duplicate": 1, "dead_letter:invalid_value": 2,
        "dead_letter:not_json": 1}
    assert "backfilling talks-archive.txt" in first.stderr and "100%" in first.stderr
    # The workers fetch and store what the backfill queued.
    wait_for(lambda: stored_urls(db) == {memorandum, closing, undated,
                                         "https://mashreq.example/archive/geneva4"}, 60,
             "the backfilled articles stored")
    assert db.execute("SELECT producer, via, count(*) FROM submissions GROUP BY 1, 2 ORDER BY 1"
                      ).fetchall() == [("archive-desk", "backfill", 2), ("backfill", "backfill", 2)]
    # The Turkish page carries no date: the message's hint fills it.
    assert one(db, "SELECT published_at::date::text FROM articles WHERE url = %s",
               undated) == "2017-09-15"
    dead = db.execute("SELECT reason, source_ref, payload FROM dead_letters ORDER BY id"
                      ).fetchall()
    assert [(reason, ref.rsplit(":", 2)[1]) for reason, ref, _ in dead] == [
        ("invalid_value", "7"), ("not_json", "8"), ("invalid_value", "10")]
    assert all(ref.startswith(str(archive.resolve()) + ":") for _, ref, _ in dead)
    assert bytes(dead[2][2]) == b"https://archive.example/caf\xe9\r\n"  # kept as sent

    loaded = db.execute("SELECT (SELECT count(*) FROM articles), (SELECT count(*) FROM"
                        " submissions), (SELECT count(*) FROM dead_letters)").fetchone()
    again = talkwire("backfill", str(archive))
    assert again.returncode == 0, again.stderr
    assert "backfill of talks-archive.txt: 0 article(s) queued" in again.stdout
    assert outcome_counts(again.stdout) == {
        "duplicate": 5, "dead_letter:invalid_value": 2, "dead_letter:not_json": 1}
    assert db.execute("SELECT (SELECT count(*) FROM articles), (SELECT count(*) FROM"
                      " submissions), (SELECT count(*) FROM dead_letters)").fetchone() == loaded


def outcome_counts(stdout: str) -> dict[str, int]:
    """The outcome table that `talkwire backfill` prints, as {outcome: lines}."""
    return {cells[1].strip(): int(cells[2]) for line in stdout.splitlines()
            if len(cells := line.split("│")) == 4 and cells[2].strip().isdigit()}
