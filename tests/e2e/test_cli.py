"""The `talkwire` command as an operator runs it, in real subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil
import psycopg
import pytest

from tests.conftest import REPO, WorkerProcess, wait_for
from worker.demo import DEMO_ROOT, SiteServer, demo_feed_paths


def talkwire(*args: str, env: dict[str, str] | None = None, timeout: float = 240,
             drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    # A wide virtual terminal, so rich does not fold URLs across table rows.
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    for key in drop:
        full_env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], env=full_env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def demo_page_count() -> int:
    """Distinct demo pages that the demo feeds link to (what a pass should store)."""
    from worker.poll import parse_feed

    urls = set()
    for path in demo_feed_paths():
        feed = parse_feed((DEMO_ROOT / path).read_bytes().replace(b"{base}", b"http://demo"),
                          base_url="http://demo/" + path)
        urls |= {e.url for e in feed.entries if e.url}
    return sum(1 for u in urls if (DEMO_ROOT / u.removeprefix("http://demo/")).is_file())


def test_migrate_feeds_add_and_list(db: psycopg.Connection, site: SiteServer) -> None:
    assert "applied 0 migration(s)" in talkwire("migrate").stdout
    added = talkwire("feeds", "add", site.url("feeds/wire-en.xml"))
    assert added.returncode == 0, added.stderr
    listed = talkwire("feeds", "list")
    assert "1 feed(s)" in listed.stdout and "wire-en.xml" in listed.stdout


def test_ingest_one_url_prints_what_was_stored(db: psycopg.Connection, site: SiteServer) -> None:
    result = talkwire("ingest", site.url("pages/geneve6-cloture.html"))
    assert result.returncode == 0, result.stderr
    assert "stored" in result.stdout and "Genève : fin du sixième cycle sans percée" in result.stdout
    assert db.execute("SELECT state, language FROM articles").fetchall() == [("stored", "fr")]


def test_ingest_of_a_blocked_url_fails_with_its_reason(db: psycopg.Connection) -> None:
    result = talkwire("ingest", "http://169.254.169.254/latest/meta-data/")
    assert result.returncode == 1
    assert "blocked_address" in result.stdout


def test_run_once_ingests_the_demo_and_prints_a_summary(db: psycopg.Connection) -> None:
    if not demo_feed_paths():
        pytest.skip("no demo feeds in seeds/demo")
    result = talkwire("run", "--once", "--timeout", "180",
                      env={"TALKWIRE_DEMO": "true", "TALKWIRE_DEMO_PORT": "0"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "talkwire run summary" in result.stdout
    feeds = db.execute("SELECT count(*), count(*) FILTER (WHERE last_success_at IS NOT NULL"
                       " AND last_reason IS NULL) FROM feeds").fetchone()
    assert feeds == (len(demo_feed_paths()), len(demo_feed_paths()))
    stored = db.execute("SELECT count(*) FROM articles WHERE state = 'stored'").fetchone()[0]
    assert stored == demo_page_count()
    assert f"│ articles stored            │ {stored:>5} │" in result.stdout


def test_run_once_on_the_embedded_default_needs_no_setup() -> None:
    if not demo_feed_paths():
        pytest.skip("no demo feeds in seeds/demo")
    with tempfile.TemporaryDirectory(prefix="twemb-") as data_dir:
        result = talkwire("run", "--once", "--timeout", "180",
                          env={"TALKWIRE_DATA_DIR": data_dir, "TALKWIRE_DEMO_PORT": "0"},
                          drop=("DATABASE_URL", "REDIS_URL", "TALKWIRE_DEMO",
                                "TALKWIRE_FETCH_ALLOW_NETWORKS", "TALKWIRE_REDIS_PREFIX"))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "embedded Postgres and Redis" in result.stderr
        assert "articles stored" in result.stdout
        stored = int(next(line for line in result.stdout.splitlines()
                          if "articles stored  " in line).split("│")[2])
        assert stored == demo_page_count()
        assert (Path(data_dir) / "postgres" / "PG_VERSION").exists()
        # Nobody else uses its servers, so the run stops them as it exits.
        wait_for(lambda: not servers_under(Path(data_dir)), 20,
                 "the embedded Postgres and Redis to stop")


def servers_under(data_dir: Path) -> list[str]:
    """Command lines of the processes working in data_dir (the embedded servers do)."""
    found = []
    for proc in psutil.process_iter(["cwd", "cmdline"]):
        cwd = proc.info["cwd"]
        if cwd and Path(cwd).is_relative_to(data_dir):
            found.append(" ".join(proc.info["cmdline"] or ()))
    return found


def test_ping_sees_a_running_worker(run_env: dict[str, str],
                                    start_worker: Callable[..., WorkerProcess]) -> None:
    assert talkwire("ping").returncode == 0
    lonely = talkwire("ping", "--workers", "--timeout", "1")
    assert lonely.returncode == 1 and "none answered" in lonely.stderr
    start_worker().wait_ready()
    assert talkwire("ping", "--workers").returncode == 0


def test_flower_serves_its_healthcheck(run_env: dict[str, str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "flower", "--address=127.0.0.1",
                             f"--port={free_port}"],
                            env=os.environ.copy(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        port = None
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "Visit me at" in line:
                port = int(line.rsplit(":", 1)[1].strip().strip("/"))
        assert port, "flower did not start"

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2) as r:
                    return r.read() == b"OK"
            except OSError:
                return False

        wait_for(healthy, 30, "flower health")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
