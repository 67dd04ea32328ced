"""Hostile targets and bytes through the real pipeline, real Postgres and a real HTTP server
(issue 8, cases 1, 3, 5-9, 12). Each case checks what a user would see in the database."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import psycopg
import pytest

from tests.conftest import FIXTURES
from tests.faults import hostile
from tests.faults.conftest import Measure, article_row, count_states
from worker import pipeline, store
from worker.config import load_settings
from worker.demo import SiteServer, serve_site
from worker.errors import ConfigError


def process_once(ctx: pipeline.Context, db: psycopg.Connection, url: str) -> tuple[int, Measure]:
    """Add one article URL and run the pipeline on it once; return its id and the cost."""
    article_id, _ = store.add_article_url(db, url, origin="cli")
    with Measure() as cost:
        pipeline.process_article(ctx, article_id)
    return article_id, cost


# --- 1. private targets ---------------------------------------------------------------------

PRIVATE_TARGETS = [
    "http://127.0.0.1:{port}/ok/fr.html",
    "http://169.254.169.254/latest/meta-data/iam/",
    "http://[::1]:{port}/ok/fr.html",
    "http://0.0.0.0:{port}/ok/fr.html",
    "http://100.100.100.200/latest/meta-data/",
    "http://[::ffff:127.0.0.1]:{port}/ok/fr.html",
    "http://[2002:7f00:1::]:{port}/ok/fr.html",
    "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
    "http://2130706433:{port}/ok/fr.html",
    "http://0177.0.0.1:{port}/ok/fr.html",
    # A name that resolves to a private address (no DNS here, so loopback via /etc/hosts; the
    # fetcher judges getaddrinfo's answer, so a name resolving to 10.x takes the same path).
    "http://localhost:{port}/ok/fr.html",
]


@pytest.fixture()
def proxy_trap() -> tuple[str, list[int]]:
    """A listening socket posing as a proxy; counts the connections it receives."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    accepted: list[int] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", accepted
    sock.close()


def test_private_targets_are_refused_before_connect_even_with_proxies_set(
        db: psycopg.Connection, strict_ctx: pipeline.Context, hostile_site: SiteServer,
        hits: hostile.Hits, proxy_trap: tuple[str, list[int]],
        monkeypatch: pytest.MonkeyPatch, record: Callable[..., None]) -> None:
    proxy, accepted = proxy_trap
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.setenv("NO_PROXY", "")
    port = hostile_site.base_url.rsplit(":", 1)[1]
    before = len(hits.paths)
    peak, slowest = 0.0, 0.0
    for template in PRIVATE_TARGETS:
        url = template.format(port=port)
        article_id, cost = process_once(strict_ctx, db, url)
        peak, slowest = max(peak, cost.peak_mb), max(slowest, cost.seconds)
        row = article_row(db, article_id)
        assert (row["state"], row["fail_reason"], row["attempts"], row["body"]) == (
            "failed", "blocked_address", 1, None), url
        # Permanent: a second delivery of the same message finds nothing to do.
        assert pipeline.process_article(strict_ctx, article_id).outcome == "stale"
    assert len(hits.paths) == before, "a private target was contacted"
    assert accepted == [], "the proxy from the environment was used"
    assert count_states(db) == {"failed": len(PRIVATE_TARGETS)}
    record("1 private targets (11 forms, proxies set)", "blocked_address, attempts=1",
           expected=0, stored=0, recover_s=slowest, peak_mb=peak)


# --- 3. redirects ---------------------------------------------------------------------------

REDIRECTS = {
    "redirect/metadata": "blocked_address",
    "redirect/file": "blocked_scheme",
    "redirect/gopher": "blocked_scheme",
    "redirect/loop-a": "redirect_loop",
    "redirect/hop/0": "too_many_redirects",
}


def test_hostile_redirects_are_refused_at_the_hop(
        db: psycopg.Connection, ctx: pipeline.Context, hostile_site: SiteServer,
        hits: hostile.Hits, record: Callable[..., None]) -> None:
    slowest = 0.0
    for path, reason in REDIRECTS.items():
        article_id, cost = process_once(ctx, db, hostile_site.url(path))
        slowest = max(slowest, cost.seconds)
        row = article_row(db, article_id)
        assert (row["state"], row["fail_reason"], row["attempts"]) == ("failed", reason, 1), path
    # The chain stopped at the cap: hop 0 plus TALKWIRE_FETCH_MAX_REDIRECTS hops were asked.
    assert hits.paths.count("redirect/hop/5") == 1 and "redirect/hop/6" not in hits.paths
    record("3 redirects: metadata, file:, gopher:, loop, 6+ hops", "refused at the hop",
           expected=0, stored=count_states(db).get("stored", 0), recover_s=slowest)


# --- 5. size bombs --------------------------------------------------------------------------

BOMBS = {
    "bomb/gzip": "too_large",          # 64 MiB of zeros in 64 KiB of gzip
    "bomb/brotli": "bad_encoding",     # refused on its Content-Encoding, before any byte
    "bomb/lie-huge": "too_large",      # Content-Length 10 GiB: refused on the header
    "bomb/chunked": "too_large",       # never ends: cut at the decoded cap
}


def test_size_bombs_stop_at_the_decoded_cap_with_bounded_memory(
        db: psycopg.Connection, ctx: pipeline.Context, hostile_site: SiteServer,
        record: Callable[..., None]) -> None:
    cap_mb = ctx.limits.max_bytes / 2**20
    peak, slowest = 0.0, 0.0
    for path, reason in BOMBS.items():
        article_id, cost = process_once(ctx, db, hostile_site.url(path))
        row = article_row(db, article_id)
        assert (row["state"], row["fail_reason"], row["body"]) == ("failed", reason, None), path
        # The body is held once, plus one decoded chunk: never the bomb's full size.
        assert cost.peak_mb < 2 * cap_mb + 8, (path, cost.peak_mb)
        peak, slowest = max(peak, cost.peak_mb), max(slowest, cost.seconds)
    # A Content-Length smaller than the body: only the declared bytes are read.
    article_id, cost = process_once(ctx, db, hostile_site.url("bomb/lie-small"))
    assert article_row(db, article_id)["fail_reason"] == "no_text"
    record("5 size bombs: gzip, brotli, lying length, endless chunked",
           f"too_large/bad_encoding at {cap_mb:.0f} MiB", expected=0, stored=0,
           recover_s=slowest, peak_mb=peak)


# --- 6. local-file tricks -------------------------------------------------------------------

LOCAL_FILES = ["file:///etc/passwd", "/etc/passwd", "feed:///etc/passwd",
               "feed:file:///etc/passwd", "feed://127.0.0.1/etc/passwd"]


def test_local_file_urls_are_refused_and_no_file_content_is_stored(
        db: psycopg.Connection, ctx: pipeline.Context, record: Callable[..., None]) -> None:
    slowest = 0.0
    for url in LOCAL_FILES:
        article_id, cost = process_once(ctx, db, url)
        slowest = max(slowest, cost.seconds)
        row = article_row(db, article_id)
        assert (row["state"], row["fail_reason"]) == ("failed", "blocked_scheme"), url
        pipeline.poll_feed(ctx, store.add_feed(db, url).id)
    feeds = db.execute("SELECT status, last_reason, title FROM feeds").fetchall()
    assert feeds == [("broken", "blocked_scheme", None)] * len(LOCAL_FILES)
    assert db.execute("SELECT count(*) FROM entries").fetchone() == (0,)
    leaked = db.execute("SELECT count(*) FROM articles WHERE body LIKE '%root:%'"
                        " OR fail_detail LIKE '%root:%'").fetchone()
    assert leaked == (0,)
    record("6 local files: file:, bare path, feed:", "blocked_scheme, nothing stored",
           expected=0, stored=0, recover_s=slowest)


# --- 7. XML attacks -------------------------------------------------------------------------

LAUGHS = ('<?xml version="1.0"?><!DOCTYPE rss [<!ENTITY lol "lol">'
          + "".join(f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">'
                    for i in range(1, 10))
          + ']><rss version="2.0"><channel><title>&lol9;</title></channel></rss>')
XXE = ('<?xml version="1.0"?><!DOCTYPE rss [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
       '<rss version="2.0"><channel><title>Dépêches</title><item><title>&xxe;</title>'
       "<link>http://127.0.0.1/a</link></item></channel></rss>")
# feedparser 6 keeps this "safe" entity and expat expands it on every reference.
QUADRATIC = ('<?xml version="1.0"?><!DOCTYPE rss [<!ENTITY a "' + "x" * 40_000 + '">]>'
             '<rss version="2.0"><channel><title>Лента</title><item><title>'
             + "&a;" * 12_000 + "</title><link>http://127.0.0.1/b</link></item></channel></rss>")
XML_ATTACKS = {
    "billion-laughs.xml": LAUGHS.encode(),
    "xxe.xml": XXE.encode(),
    "quadratic.xml": QUADRATIC.encode(),
    "laughs-utf16.xml": LAUGHS.replace('<?xml version="1.0"?>', "").encode("utf-16-le"),
}


def test_xml_attacks_are_recorded_as_bad_feeds_cheaply(
        db: psycopg.Connection, ctx: pipeline.Context,
        record: Callable[..., None]) -> None:
    routes = {f"feeds/{name}": hostile.static(body, ctype="application/rss+xml")
              for name, body in XML_ATTACKS.items()}
    site = serve_site(FIXTURES / "site", routes=routes)
    try:
        peak, slowest = 0.0, 0.0
        for name in XML_ATTACKS:
            feed_id = store.add_feed(db, site.url(f"feeds/{name}")).id
            with Measure() as cost:
                outcome = pipeline.poll_feed(ctx, feed_id)
            assert (outcome.outcome, outcome.reason) == ("failed", "xml_entities"), name
            assert cost.peak_mb < 50, (name, cost.peak_mb)
            peak, slowest = max(peak, cost.peak_mb), max(slowest, cost.seconds)
    finally:
        site.close()
    assert db.execute("SELECT status, last_reason FROM feeds").fetchall() == [
        ("broken", "xml_entities")] * len(XML_ATTACKS)
    assert db.execute("SELECT count(*) FROM articles").fetchone() == (0,)
    record("7 XML: billion laughs, XXE, quadratic, UTF-16", "bad feed (xml_entities)",
           expected=0, stored=0, recover_s=slowest, peak_mb=peak)


# --- 8. broken encodings --------------------------------------------------------------------

ENCODINGS = {
    # (body, Content-Type, a phrase the stored text must hold, the warning recorded)
    "cp1252-as-utf8": (hostile.page_html("fr", "Genève : la séance reprend").encode("cp1252"),
                       "text/html; charset=utf-8", "l'envoyé spécial a salué « un climat",
                       "decoded_as:windows-1252"),
    "utf16-no-bom": (hostile.page_html("ar", "محادثات جنيف").encode("utf-16-le"),
                     "text/html", "اجتمعت الوفود في جنيف", "utf16_without_bom:utf-16-le"),
    "invalid-bytes": (hostile.page_html("de", "Astana: vierte Runde").encode().replace(
        "Gesprächsrunde".encode(), "Gespr\xe4chs\xff\xferunde".encode("latin-1")),
        "text/html; charset=utf-8", "über Deeskalationszonen", "invalid_bytes"),
    "nul-and-surrogates": (hostile.page_html("ru", "Астана: новый раунд").replace(
        "Делегации", "Деле\x00гации \ud800").encode("utf-8", "surrogatepass"),
        "text/html; charset=utf-8", "режим прекращения огня", "nul_bytes"),
}


def test_broken_encodings_are_stored_as_valid_text_with_the_problem_recorded(
        db: psycopg.Connection, ctx: pipeline.Context, record: Callable[..., None]) -> None:
    site = serve_site(FIXTURES / "site", routes={
        name: hostile.static(body, ctype=ctype) for name, (body, ctype, _, _) in ENCODINGS.items()})
    try:
        peak, slowest = 0.0, 0.0
        for name, (_, _, phrase, warning) in ENCODINGS.items():
            article_id, cost = process_once(ctx, db, site.url(name))
            peak, slowest = max(peak, cost.peak_mb), max(slowest, cost.seconds)
            row = article_row(db, article_id)
            assert row["state"] == "stored", (name, row["fail_reason"], row["fail_detail"])
            body = str(row["body"])
            assert phrase in body, name
            assert "\x00" not in body
            body.encode("utf-8")  # no lone surrogate survived (this raises if one did)
            if name == "cp1252-as-utf8":
                assert "\ufffd" not in body  # decoded, not replaced
            assert warning in row["extract_warnings"], (name, row["extract_warnings"])
    finally:
        site.close()
    record("8 encodings: cp1252 as UTF-8, UTF-16 no BOM, invalid, NUL+surrogate",
           "stored, problem in extract_warnings", expected=4,
           stored=count_states(db).get("stored", 0), recover_s=slowest, peak_mb=peak)


# --- 9. pathological HTML -------------------------------------------------------------------

PATHOLOGICAL = {
    "html/links": ("stored", "html_capped"),
    "html/rows": ("stored", "html_capped"),
    "html/deep": ("failed", "no_text"),      # libxml2 stops at its depth limit; nothing left
    "html/text-20mb": ("failed", "too_large"),
}


def test_pathological_html_is_capped_or_finishes(
        db: psycopg.Connection, ctx: pipeline.Context, hostile_site: SiteServer,
        record: Callable[..., None]) -> None:
    peak, slowest = 0.0, 0.0
    for path, (state, mark) in PATHOLOGICAL.items():
        article_id, cost = process_once(ctx, db, hostile_site.url(path))
        row = article_row(db, article_id)
        assert row["state"] == state, (path, row["fail_reason"])
        if state == "stored":
            assert any(w.startswith(mark) for w in row["extract_warnings"]), path
        else:
            assert row["fail_reason"] == mark, path
        peak, slowest = max(peak, cost.peak_mb), max(slowest, cost.seconds)
    record("9 HTML: 100k links, 60k rows, deep nesting, 20 MB text", "capped / recorded",
           expected=2, stored=count_states(db).get("stored", 0), recover_s=slowest,
           peak_mb=peak)


# --- 12. a run longer than the lease or the visibility timeout ------------------------------


def test_two_runs_of_one_article_store_it_once(
        db: psycopg.Connection, settings: object, record: Callable[..., None]) -> None:
    # The page takes longer than the lease, so a second delivery takes the lease again while
    # the first run is still fetching: both reach the store, one wins.
    page = (FIXTURES / "site" / "pages" / "astana4-arrival.html").read_bytes()
    gate = threading.Event()

    def slow(handler: object, base: str) -> None:
        gate.wait(10)
        hostile.send(handler, page, ctype="text/html; charset=utf-8")  # type: ignore[arg-type]

    site = serve_site(FIXTURES / "site", routes={"slow.html": slow})
    last_change = db.execute("SELECT coalesce(max(id), 0) FROM changes").fetchone()[0]
    first = pipeline.open_context(load_settings(lease_seconds=1))
    second = pipeline.open_context(load_settings(lease_seconds=1))
    try:
        article_id, _ = store.add_article_url(db, site.url("slow.html"), origin="cli")
        outcomes: list[str] = []
        runner = threading.Thread(target=lambda: outcomes.append(
            pipeline.process_article(first, article_id).outcome))
        runner.start()
        time.sleep(1.5)  # the first run's lease has run out; it is still waiting on the page
        racer = threading.Thread(target=lambda: outcomes.append(
            pipeline.process_article(second, article_id).outcome))
        racer.start()
        time.sleep(0.5)
        gate.set()
        runner.join(30)
        racer.join(30)
    finally:
        first.close()
        second.close()
        site.close()
    assert sorted(outcomes) == ["stale", "stored"]
    assert article_row(db, article_id)["attempts"] == 2
    assert count_states(db) == {"stored": 1}
    assert db.execute("SELECT count(*) FROM changes WHERE event = 'article_created'"
                      " AND id > %s", (last_change,)).fetchone() == (1,)
    assert db.execute("SELECT count(*) FROM dedup_decisions").fetchone() == (1,)
    # And the configuration refuses limits that would let Redis redeliver a running task.
    with pytest.raises(ConfigError, match="VISIBILITY_TIMEOUT"):
        load_settings(visibility_timeout=100, task_time_limit=150, task_soft_time_limit=120)
    record("12 run outlives lease/visibility (two runs race)", "one stored, one stale",
           expected=1, stored=1)


# --- 1 (names) and 2. names that resolve inside, and DNS rebinding --------------------------


class Resolver:
    """A stand-in DNS (there is none here): answers per name, in turn; counts the lookups.

    Only the system resolver is replaced; the fetcher, pipeline and store are the real ones.
    """

    def __init__(self) -> None:
        self.answers: dict[str, list[str]] = {}
        self.lookups: list[str] = []
        self._real = socket.getaddrinfo

    def getaddrinfo(self, host: object, port: object, *args: object, **kwargs: object) -> object:
        """socket.getaddrinfo, answering the names given in `answers` (the last one sticks)."""
        if isinstance(host, str) and host in self.answers:
            queue = self.answers[host]
            ip = queue.pop(0) if len(queue) > 1 else queue[0]
            self.lookups.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]
        return self._real(host, port, *args, **kwargs)  # type: ignore[arg-type]


@pytest.fixture()
def resolver(monkeypatch: pytest.MonkeyPatch) -> Resolver:
    """Install the stand-in resolver for one test."""
    stand_in = Resolver()
    monkeypatch.setattr(socket, "getaddrinfo", stand_in.getaddrinfo)
    return stand_in


def test_a_name_resolving_to_a_private_address_is_refused(
        db: psycopg.Connection, strict_ctx: pipeline.Context, resolver: Resolver,
        record: Callable[..., None]) -> None:
    resolver.answers["wire.intranet.example"] = ["10.20.30.40"]
    article_id, _ = process_once(strict_ctx, db, "http://wire.intranet.example/feed/a.html")
    row = article_row(db, article_id)
    assert (row["state"], row["fail_reason"], row["attempts"]) == ("failed", "blocked_address", 1)
    record("1 name resolving to 10.x", "blocked_address, attempts=1", expected=0, stored=0)


def test_dns_rebinding_cannot_reach_the_second_answer(
        db: psycopg.Connection, hostile_site: SiteServer, hits: hostile.Hits, resolver: Resolver, record: Callable[..., None]) -> None:
    # First answer public (screened, admitted), every later one loopback: a client that
    # resolved again at connect time would reach the local server.
    port = int(hostile_site.base_url.rsplit(":", 1)[1])
    resolver.answers["rebind.example"] = ["93.184.215.14", "127.0.0.1"]  # global; no route here
    ctx = pipeline.open_context(load_settings(fetch_allow_networks=(), fetch_connect_timeout=1,
                                              fetch_deadline=2))
    before = len(hits.paths)
    try:
        article_id, _ = process_once(ctx, db, f"http://rebind.example:{port}/ok/fr.html")
    finally:
        ctx.close()
    row = article_row(db, article_id)
    assert row["state"] != "stored" and row["body"] is None
    assert row["fail_reason"] in ("connect_error", "timeout")  # it tried the screened address
    assert resolver.lookups == ["rebind.example"]  # resolved once, never again to connect
    assert len(hits.paths) == before  # the loopback server behind the rebinding saw nothing
    record("2 DNS rebinding (public, then loopback)", "connected to the screened IP only",
           expected=0, stored=0)
