"""fetch_url against a real, hostile HTTP server on 127.0.0.1 (no mocks of talkwire code)."""

from __future__ import annotations

import gzip
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import pytest

from worker.errors import Permanent, Transient
from worker.fetch import check_url, fetch_url, is_public_address, make_client
from worker.types import FetchLimits

LOCAL = (ipaddress.ip_network("127.0.0.1/32"),)
BOMB = gzip.compress(bytes(50 * 1024 * 1024), 9)  # 50 MiB of zeros in ~50 KB
REAL_GETADDRINFO = socket.getaddrinfo


def limits(**overrides: object) -> FetchLimits:
    """Limits that admit the loopback test server and fail fast."""
    values: dict[str, object] = {"allow_networks": LOCAL, "deadline": 5.0, "max_bytes": 1024 * 1024}
    values.update(overrides)
    return FetchLimits(**values)  # type: ignore[arg-type]


class Hostile(BaseHTTPRequestHandler):
    """One route per misbehaviour; the route is the request path."""

    protocol_version = "HTTP/1.1"
    routes: ClassVar[dict[str, Callable[[Hostile], None]]] = {}

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""

    def do_GET(self) -> None:
        """Dispatch on the path (prefix match for numbered routes)."""
        path = urlsplit(self.path).path
        route = self.routes.get(path) or self.routes.get(path.rsplit("/", 1)[0] + "/")
        self.close_connection = True
        try:
            (route or (lambda h: h.reply(404, b"no route")))(self)
        except OSError:
            pass  # the client gave up, which is the point of most routes

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        """Send a complete response with a truthful Content-Length."""
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if status != 304:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def chunked(self, framed: bytes) -> None:
        """Send a 200 whose body is `framed`, already cut into chunks (or not quite)."""
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(framed)

    def redirect(self, status: int, location: str) -> None:
        """Send a redirect to `location`."""
        self.reply(status, b"", {"Location": location})

    @property
    def base(self) -> str:
        """This server's own origin."""
        return f"http://127.0.0.1:{self.connection.getsockname()[1]}"


def route(path: str) -> Callable[[Callable[[Hostile], None]], Callable[[Hostile], None]]:
    """Register a handler for a path (a trailing slash makes it a prefix)."""

    def register(fn: Callable[[Hostile], None]) -> Callable[[Hostile], None]:
        Hostile.routes[path] = fn
        return fn

    return register


@route("/page")
def _page(h: Hostile) -> None:
    h.reply(200, b"hello world", {"Content-Type": "text/html; charset=ISO-8859-1",
                                  "ETag": '"v1"', "Last-Modified": "Wed, 01 Jan 2025 00:00:00 GMT"})


@route("/echo")
def _echo(h: Hostile) -> None:
    h.reply(200, json.dumps(dict(h.headers.items())).encode(), {"Content-Type": "application/json"})


@route("/target/")
def _target(h: Hostile) -> None:  # the request target exactly as it arrived
    h.reply(200, h.path.encode("ascii", "backslashreplace"), {"Content-Type": "text/plain"})


@route("/to-utf8-slug")
def _to_utf8_slug(h: Hostile) -> None:  # raw UTF-8 in Location, as some news sites send it
    h.wfile.write(b"HTTP/1.1 302 Found\r\nLocation: /target/\xd8\xa3\xd8\xb3\xd8\xaa\xd8\xa7"
                  b"\xd9\x86\xd8\xa7\r\nContent-Length: 0\r\n\r\n")


@route("/early-hints")
def _early_hints(h: Hostile) -> None:  # an interim 103 before the answer
    h.wfile.write(b"HTTP/1.1 103 Early Hints\r\nLink: </site.css>; rel=preload\r\n\r\n"
                  b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 5\r\n\r\nhello")


@route("/chunked")
def _chunked(h: Hostile) -> None:
    h.chunked(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")


@route("/bad-chunk")
def _bad_chunk(h: Hostile) -> None:
    h.chunked(b"zz\r\nhello\r\n0\r\n\r\n")  # a chunk size that is not hexadecimal


@route("/etag")
def _etag(h: Hostile) -> None:
    if h.headers.get("If-None-Match") == '"v1"':
        h.reply(304, b"", {"ETag": '"v1"'})
    else:
        h.reply(200, b"fresh", {"ETag": '"v1"', "Content-Type": "application/rss+xml"})


@route("/gzip")
def _gzip(h: Hostile) -> None:
    h.reply(200, gzip.compress(b"gz" * 1000), {"Content-Encoding": "gzip"})


@route("/deflate")
def _deflate(h: Hostile) -> None:
    h.reply(200, zlib.compress(b"zl" * 1000), {"Content-Encoding": "deflate"})


@route("/raw-deflate")
def _raw_deflate(h: Hostile) -> None:
    squeeze = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    h.reply(200, squeeze.compress(b"rd" * 1000) + squeeze.flush(), {"Content-Encoding": "deflate"})


@route("/perm/")
def _perm(h: Hostile) -> None:  # 301 (relative Location) -> 308 (absolute) -> /page
    n = int(h.path.rsplit("/", 1)[1])
    if n == 1:
        h.redirect(301, "/perm/2")
    else:
        h.redirect(308, f"{h.base}/page")


@route("/mixed/")
def _mixed(h: Hostile) -> None:  # 301 -> 302 -> /page: not a permanent move
    n = int(h.path.rsplit("/", 1)[1])
    if n == 1:
        h.redirect(301, "/mixed/2")
    else:
        h.redirect(302, "../page")


@route("/to-metadata")
def _to_metadata(h: Hostile) -> None:
    h.redirect(302, "http://169.254.169.254/latest/meta-data/")


@route("/to-file")
def _to_file(h: Hostile) -> None:
    h.redirect(302, "file:///etc/passwd")


@route("/loop/")
def _loop(h: Hostile) -> None:
    h.redirect(302, "/loop/b" if h.path.endswith("/a") else "/loop/a")


@route("/hops/")
def _hops(h: Hostile) -> None:
    h.redirect(302, f"/hops/{int(h.path.rsplit('/', 1)[1]) + 1}")


@route("/slow-hops/")
def _slow_hops(h: Hostile) -> None:  # each hop is quick enough; the chain is not
    time.sleep(0.4)
    h.redirect(302, f"/slow-hops/{int(h.path.rsplit('/', 1)[1]) + 1}")


@route("/no-location")
def _no_location(h: Hostile) -> None:
    h.reply(302)


@route("/bomb")
def _bomb(h: Hostile) -> None:
    h.reply(200, BOMB, {"Content-Encoding": "gzip"})


@route("/double-bomb")
def _double_bomb(h: Hostile) -> None:
    h.reply(200, gzip.compress(BOMB), {"Content-Encoding": "gzip, gzip"})


@route("/brotli")
def _brotli(h: Hostile) -> None:
    h.reply(200, b"\x8b\x02\x80hello\x03", {"Content-Encoding": "br"})


@route("/lie-small")
def _lie_small(h: Hostile) -> None:  # claims 10 bytes, then keeps sending
    h.send_response(200)
    h.send_header("Content-Length", "10")
    h.end_headers()
    for _ in range(64):
        h.wfile.write(b"x" * 65536)


@route("/lie-huge")
def _lie_huge(h: Hostile) -> None:
    h.send_response(200)
    h.send_header("Content-Length", str(10**12))
    h.end_headers()
    h.wfile.write(b"x" * 1000)


@route("/lie-short")
def _lie_short(h: Hostile) -> None:  # claims 1000 bytes, sends 10, hangs up
    h.send_response(200)
    h.send_header("Content-Length", "1000")
    h.end_headers()
    h.wfile.write(b"x" * 10)


@route("/endless")
def _endless(h: Hostile) -> None:
    h.send_response(200)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    chunk = b"%x\r\n%s\r\n" % (65536, b"y" * 65536)
    for _ in range(10_000):
        h.wfile.write(chunk)


@route("/drip")
def _drip(h: Hostile) -> None:  # headers at once, then one body byte every 0.5 s
    h.send_response(200)
    h.send_header("Content-Length", "100")
    h.end_headers()
    for _ in range(100):
        h.wfile.write(b"d")
        h.wfile.flush()
        time.sleep(0.5)


@route("/drip-headers")
def _drip_headers(h: Hostile) -> None:  # never finishes its headers; no single read is slow
    h.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    for _ in range(100):
        h.wfile.write(b"a")
        h.wfile.flush()
        time.sleep(0.3)


@route("/silent")
def _silent(h: Hostile) -> None:
    time.sleep(5)


@route("/status/")
def _status(h: Hostile) -> None:
    code = int(h.path.rsplit("/", 1)[1])
    in_two_minutes = datetime.now(UTC) + timedelta(seconds=120)
    headers = {"429": {"Retry-After": "7"},
               "503": {"Retry-After": format_datetime(in_two_minutes, usegmt=True)}}
    h.reply(code, b"status", headers.get(str(code), {}))


@pytest.fixture(scope="module")
def hostile_server() -> Iterator[str]:
    """A misbehaving HTTP server on 127.0.0.1; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def fake_dns(monkeypatch: pytest.MonkeyPatch, table: dict[str, list[str]]) -> list[str]:
    """Answer getaddrinfo for made-up names from `table`; returns the names asked for."""
    asked: list[str] = []

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in table:
            return REAL_GETADDRINFO(host, port, *args, **kwargs)
        asked.append(host)
        if not table[host]:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (ip, port)) for ip in table[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def raises(exc_type: type[Exception], reason: str, fn: Callable[[], object]) -> Exception:
    """Assert fn raises exc_type with the given reason code; return the error."""
    with pytest.raises(exc_type) as info:
        fn()
    assert info.value.reason == reason, info.value  # type: ignore[attr-defined]
    return info.value


# --- SSRF ---------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/", "http://169.254.169.254/", "http://[::1]/", "http://0.0.0.0/",
    "http://100.100.100.200/", "http://[::ffff:127.0.0.1]/", "http://[2002:7f00:1::]/",
    "http://[64:ff9b::a9fe:a9fe]/", "http://2130706433/", "http://0177.0.0.1/",
    "http://localhost/",
])
def test_internal_addresses_are_blocked(url: str) -> None:
    raises(Permanent, "blocked_address", lambda: fetch_url(url, FetchLimits()))


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "gopher://example.com/", "ftp://example.com/x", "feed://example.com/rss",
    "/etc/passwd", "http:///nohost", "", "javascript:alert(1)",
])
def test_non_http_urls_are_blocked(url: str) -> None:
    raises(Permanent, "blocked_scheme", lambda: fetch_url(url, FetchLimits()))


@pytest.mark.parametrize(("address", "public"), [
    ("93.184.216.34", True), ("2606:4700:4700::1111", True), ("::ffff:8.8.8.8", True),
    ("64:ff9b::808:808", True), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("224.0.0.1", False), ("255.255.255.255", False), ("fe80::1", False), ("fc00::1", False),
    ("fec0::1", False), ("ff02::1", False), ("::", False), ("::7f00:1", False),
    ("2001::1", False), ("2002:a00:1::", False), ("2001:db8::1", False), ("198.18.0.1", False),
])
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_any_private_answer_blocks_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, {"mixed.test": ["93.184.216.34", "10.0.0.5"]})
    raises(Permanent, "blocked_address",
           lambda: check_url("https://mixed.test/feed", FetchLimits()))


def test_dns_failure_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, {"gone.test": []})
    raises(Transient, "dns_error", lambda: fetch_url("http://gone.test/", FetchLimits()))


def test_connects_to_the_vetted_ip_with_the_real_host(monkeypatch: pytest.MonkeyPatch,
                                                      hostile_server: str) -> None:
    port = urlsplit(hostile_server).port
    asked = fake_dns(monkeypatch, {"news.test": ["127.0.0.1"]})
    page = fetch_url(f"http://news.test:{port}/echo", limits())
    assert json.loads(page.body)["Host"] == f"news.test:{port}"
    assert page.final_url == f"http://news.test:{port}/echo"
    assert asked == ["news.test"]  # resolved once, for the check; the connection goes to the IP


def test_redirect_to_metadata_is_blocked_even_with_loopback_allowed(hostile_server: str) -> None:
    raises(Permanent, "blocked_address",
           lambda: fetch_url(f"{hostile_server}/to-metadata", limits()))


def test_redirect_to_file_is_blocked(hostile_server: str) -> None:
    raises(Permanent, "blocked_scheme", lambda: fetch_url(f"{hostile_server}/to-file", limits()))


def test_environment_proxies_are_ignored(monkeypatch: pytest.MonkeyPatch,
                                         hostile_server: str) -> None:
    proxies = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
    for name in proxies:
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens on the discard port
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert fetch_url(f"{hostile_server}/page", limits()).body == b"hello world"
    with make_client() as client:
        assert fetch_url(f"{hostile_server}/page", limits(), client=client).status == 200


# --- pages, headers, conditional GET -------------------------------------------------------


def test_normal_page(hostile_server: str) -> None:
    page = fetch_url(f"{hostile_server}/page", limits())
    assert (page.status, page.body) == (200, b"hello world")
    assert (page.content_type, page.charset) == ("text/html", "iso-8859-1")
    assert page.etag == '"v1"' and page.last_modified == "Wed, 01 Jan 2025 00:00:00 GMT"
    assert page.url == page.final_url == f"{hostile_server}/page"
    assert page.redirects == () and page.moved_to is None and not page.not_modified


def test_request_headers(hostile_server: str) -> None:
    sent = json.loads(fetch_url(f"{hostile_server}/echo", limits(user_agent="tw-test/1"),
                                accept="application/rss+xml").body)
    assert sent["User-Agent"] == "tw-test/1" and sent["Accept"] == "application/rss+xml"
    assert "If-None-Match" not in sent
    assert json.loads(fetch_url(f"{hostile_server}/echo", limits()).body)["Accept"] == "*/*"


def test_an_iri_is_sent_percent_encoded(hostile_server: str) -> None:
    # Feeds in Arabic and Russian list article links with raw letters and spaces in them.
    page = fetch_url(f"{hostile_server}/target/محادثات أستانا?q=Женева 5&x=%D8%A3", limits())
    assert page.body == (b"/target/%D9%85%D8%AD%D8%A7%D8%AF%D8%AB%D8%A7%D8%AA%20%D8%A3%D8%B3"
                         b"%D8%AA%D8%A7%D9%86%D8%A7?q=%D0%96%D0%B5%D0%BD%D0%B5%D0%B2%D0%B0%205"
                         b"&x=%D8%A3")  # an escape already made is not escaped again


def test_a_location_in_raw_utf8_is_followed_to_its_slug(hostile_server: str) -> None:
    page = fetch_url(f"{hostile_server}/to-utf8-slug", limits())
    assert page.redirects == (f"{hostile_server}/target/أستانا",)
    assert page.body == b"/target/%D8%A3%D8%B3%D8%AA%D8%A7%D9%86%D8%A7"


def test_credentials_in_the_url_are_sent_as_basic_auth(hostile_server: str) -> None:
    origin = hostile_server.replace("http://", "http://wire:p%40ss@")
    sent = json.loads(fetch_url(f"{origin}/echo", limits()).body)
    assert sent["Authorization"] == "Basic d2lyZTpwQHNz"  # wire:p@ss
    assert "Authorization" not in json.loads(fetch_url(f"{hostile_server}/echo", limits()).body)


def test_an_international_hostname_is_sent_in_its_idna_form(
        monkeypatch: pytest.MonkeyPatch, hostile_server: str) -> None:
    port = urlsplit(hostile_server).port
    asked = fake_dns(monkeypatch, {"xn--h1alffa9f.test": ["127.0.0.1"]})
    page = fetch_url(f"http://Россия.test:{port}/echo", limits())
    assert json.loads(page.body)["Host"] == f"xn--h1alffa9f.test:{port}"
    assert asked == ["xn--h1alffa9f.test"]


def test_an_interim_103_is_passed_over(hostile_server: str) -> None:
    page = fetch_url(f"{hostile_server}/early-hints", limits())
    assert (page.status, page.content_type, page.body) == (200, "text/html", b"hello")


def test_chunked_bodies(hostile_server: str) -> None:
    assert fetch_url(f"{hostile_server}/chunked", limits()).body == b"hello world"
    raises(Transient, "connect_error", lambda: fetch_url(f"{hostile_server}/bad-chunk", limits()))


def test_conditional_get(hostile_server: str) -> None:
    first = fetch_url(f"{hostile_server}/etag", limits())
    assert first.status == 200 and first.body == b"fresh" and first.charset is None
    again = fetch_url(f"{hostile_server}/etag", limits(), etag=first.etag,
                      last_modified="Wed, 01 Jan 2025 00:00:00 GMT")
    assert again.status == 304 and again.not_modified and again.body == b""


@pytest.mark.parametrize(("path", "body"), [
    ("/gzip", b"gz" * 1000), ("/deflate", b"zl" * 1000), ("/raw-deflate", b"rd" * 1000),
])
def test_compressed_bodies_are_decoded(hostile_server: str, path: str, body: bytes) -> None:
    assert fetch_url(hostile_server + path, limits()).body == body


# --- redirects -----------------------------------------------------------------------------


def test_permanent_redirect_chain_sets_moved_to(hostile_server: str) -> None:
    page = fetch_url(f"{hostile_server}/perm/1", limits())
    assert page.body == b"hello world" and page.url == f"{hostile_server}/perm/1"
    assert page.redirects == (f"{hostile_server}/perm/2", f"{hostile_server}/page")
    assert page.final_url == page.moved_to == f"{hostile_server}/page"


def test_a_302_in_the_chain_leaves_moved_to_unset(hostile_server: str) -> None:
    page = fetch_url(f"{hostile_server}/mixed/1", limits())
    assert page.final_url == f"{hostile_server}/page" and page.moved_to is None
    assert len(page.redirects) == 2


def test_redirect_failures(hostile_server: str) -> None:
    raises(Permanent, "redirect_loop", lambda: fetch_url(f"{hostile_server}/loop/a", limits()))
    raises(Permanent, "too_many_redirects", lambda: fetch_url(f"{hostile_server}/hops/0", limits()))
    raises(Permanent, "bad_redirect", lambda: fetch_url(f"{hostile_server}/no-location", limits()))
    raises(Permanent, "too_many_redirects",
           lambda: fetch_url(f"{hostile_server}/perm/1", limits(max_redirects=1)))


# --- size ------------------------------------------------------------------------------------


def test_gzip_bomb_is_cut_after_decoding(hostile_server: str) -> None:
    started = time.monotonic()
    raises(Permanent, "too_large", lambda: fetch_url(f"{hostile_server}/bomb", limits()))
    assert time.monotonic() - started < 2


def test_stacked_encodings_are_refused(hostile_server: str) -> None:
    raises(Permanent, "bad_encoding", lambda: fetch_url(f"{hostile_server}/double-bomb", limits()))
    raises(Permanent, "bad_encoding", lambda: fetch_url(f"{hostile_server}/brotli", limits()))


def test_content_length_is_never_the_count(hostile_server: str) -> None:
    assert fetch_url(f"{hostile_server}/lie-small", limits()).body == b"x" * 10
    raises(Permanent, "too_large", lambda: fetch_url(f"{hostile_server}/lie-huge", limits()))
    raises(Transient, "connect_error", lambda: fetch_url(f"{hostile_server}/lie-short", limits()))


def test_endless_chunked_body(hostile_server: str) -> None:
    raises(Permanent, "too_large", lambda: fetch_url(f"{hostile_server}/endless", limits()))


# --- time ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/drip", "/drip-headers", "/silent", "/slow-hops/0"])
def test_total_deadline(hostile_server: str, path: str) -> None:
    started = time.monotonic()
    raises(Transient, "timeout",
           lambda: fetch_url(hostile_server + path, limits(deadline=1.2, max_redirects=20)))
    assert time.monotonic() - started < 2.0


def test_each_of_overlapping_fetches_keeps_its_own_deadline(hostile_server: str) -> None:
    # One thread per process watches every fetch's deadline: a later fetch with a shorter
    # deadline must not wait for the earlier, longer one, and a fetch that finishes is left
    # alone after its deadline.
    outcomes: dict[str, tuple[str, float]] = {}

    def fetch(name: str, path: str, deadline: float) -> None:
        started = time.monotonic()
        try:
            fetch_url(hostile_server + path, limits(deadline=deadline))
            outcomes[name] = ("ok", time.monotonic() - started)
        except Transient as exc:
            outcomes[name] = (exc.reason, time.monotonic() - started)

    slow = threading.Thread(target=fetch, args=("long", "/drip", 3.0))
    slow.start()
    time.sleep(0.2)
    fetch("short", "/drip", 0.8)
    fetch("done", "/page", 0.5)
    time.sleep(0.7)  # past the finished fetch's deadline
    slow.join()
    assert outcomes["short"][0] == "timeout" and outcomes["short"][1] < 1.5
    assert outcomes["done"][0] == "ok"
    assert outcomes["long"][0] == "timeout" and 2.5 < outcomes["long"][1] < 4.0


def test_connection_refused_is_transient() -> None:
    with socket.socket() as probe:  # a port that was just free and has no listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    raises(Transient, "connect_error", lambda: fetch_url(f"http://127.0.0.1:{port}/", limits()))


# --- status mapping --------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "kind"), [
    (404, Permanent), (410, Permanent), (403, Permanent), (408, Transient), (500, Transient),
    (502, Transient), (503, Transient), (429, Transient),
])
def test_status_mapping(hostile_server: str, code: int, kind: type[Exception]) -> None:
    raises(kind, f"http_{code}", lambda: fetch_url(f"{hostile_server}/status/{code}", limits()))


def test_retry_after(hostile_server: str) -> None:
    err = raises(Transient, "http_429", lambda: fetch_url(f"{hostile_server}/status/429", limits()))
    assert err.retry_after == 7.0  # type: ignore[attr-defined]
    err = raises(Transient, "http_503", lambda: fetch_url(f"{hostile_server}/status/503", limits()))
    assert 100 < err.retry_after <= 120  # type: ignore[attr-defined]
    err = raises(Transient, "http_500", lambda: fetch_url(f"{hostile_server}/status/500", limits()))
    assert err.retry_after is None  # type: ignore[attr-defined]


# --- TLS: SNI and certificate checks use the hostname, not the IP we connect to ---------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path, list[str]]]:
    """An HTTPS server on 127.0.0.1 whose certificate names only sni.test."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available to make a test certificate")
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec",
                    "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                    "-subj", "/CN=sni.test", "-addext", "subjectAltName=DNS:sni.test",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    seen_sni: list[str] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: seen_sni.append(name)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], cert, seen_sni
    server.shutdown()
    server.server_close()


def test_https_uses_hostname_for_sni_and_verification(
    monkeypatch: pytest.MonkeyPatch, tls_server: tuple[int, Path, list[str]]
) -> None:
    port, cert, seen_sni = tls_server
    fake_dns(monkeypatch, {"sni.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    trust_test_cert = ssl.create_default_context(cafile=str(cert))
    with make_client(tls=trust_test_cert) as client:
        page = fetch_url(f"https://sni.test:{port}/echo", limits(), client=client)
        assert json.loads(page.body)["Host"] == f"sni.test:{port}"
        assert seen_sni[-1] == "sni.test" and page.final_url.startswith("https://sni.test:")
        # Same IP, wrong name: the certificate check must fail rather than trust the address.
        raises(Transient, "connect_error",
               lambda: fetch_url(f"https://other.test:{port}/echo", limits(), client=client))
