"""Fetch one URL under hard limits: SSRF checks, a total deadline, a decoded-size cap.

Every hop is vetted before it is contacted and the connection goes to the vetted IP literal,
so a DNS answer that changes between check and connect (rebinding) cannot reach inside.

The HTTP is the standard library's http.client on a socket opened here: one request per
connection, so there is no pool to pick a connection by IP, and the socket is at hand for
the deadline's watchdog. In interleaved runs of ops/bench pipeline a page fetched on
127.0.0.1 cost 1.7-2.0 ms of CPU through httpx and 0.7-0.8 ms this way (issue 9).
"""

from __future__ import annotations

import base64
import heapq
import http.client
import ipaddress
import itertools
import os
import re
import socket
import ssl
import threading
import time
import zlib
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Self
from urllib.parse import quote, unquote, urljoin, urlsplit

import certifi
import idna

from worker.errors import Permanent, Transient
from worker.types import FetchLimits, Page

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Legal hostname characters after IDNA; others (spaces, controls) would otherwise end up as a
# dns_error that is retried forever.
_HOST_CHARS = re.compile(r"[A-Za-z0-9._:%-]+")
# Characters sent as they are in a request target; anything else (spaces, controls, non-ASCII
# of an IRI) is percent-encoded as UTF-8. '%' is kept, so escapes already made stay single.
_TARGET_SAFE = "!#$%&'()*+,/:;=?@[]~"


def is_public_address(ip: IPAddress) -> bool:
    """True when the address is globally routable and not special-purpose in any way."""
    if isinstance(ip, ipaddress.IPv6Address):
        # Transition forms deliver to the IPv4 address they carry, so that address is judged.
        v4 = ip.ipv4_mapped or ip.sixtofour
        if v4 is None and ip in _NAT64:
            v4 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if v4 is not None:
            return is_public_address(v4)
        if ip.teredo is not None or ip.is_site_local:
            return False
    # is_global alone is not enough on 3.11: it admits multicast, fec0::/10 and ::/8 forms.
    special = ip.is_multicast or ip.is_reserved or ip.is_private or ip.is_loopback
    return ip.is_global and not (special or ip.is_link_local or ip.is_unspecified)


def _resolve(host: str, port: int, timeout: float | None) -> list[Any]:
    """getaddrinfo in a helper thread, because getaddrinfo itself has no timeout.

    A host written as an IP address in its standard form needs no lookup: it is answered
    here, in getaddrinfo's shape. Other spellings of an address (2130706433, 0177.0.0.1,
    127.1) are not standard forms, so getaddrinfo still reads them."""
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, ValueError) as exc:  # gaierror, or a name IDNA cannot encode
            box.append(exc)

    thread = threading.Thread(target=run, name="talkwire-dns", daemon=True)
    thread.start()
    thread.join(timeout)
    if not box:
        raise Transient("timeout", f"resolving {host} outlived the deadline")
    answers = box[0]
    if isinstance(answers, Exception) or not answers:
        raise Transient("dns_error", f"{host}: {answers or 'no addresses'}")
    return list(answers)


def check_url(
    url: str, limits: FetchLimits, *, timeout: float | None = None
) -> tuple[str, int, str]:
    """Vet a URL's scheme and every address its host resolves to; return (host, port, ip)."""
    try:
        parts = urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
        host = parts.hostname or ""
        if not host.isascii():  # DNS, SNI and Host all need the IDNA form
            host = idna.encode(host, uts46=True).decode("ascii")
    except (ValueError, idna.IDNAError) as exc:  # UnicodeError is a ValueError
        raise Permanent("bad_url", f"{url!r}: {exc}") from exc
    if parts.scheme not in _DEFAULT_PORTS or not host:
        raise Permanent("blocked_scheme", f"{url!r} is not an http(s) URL with a host")
    if not _HOST_CHARS.fullmatch(host):
        raise Permanent("bad_url", f"bad hostname {host!r}")
    # getaddrinfo (inet_aton) reads 2130706433 and 0177.0.0.1 as 127.0.0.1; judging its output
    # rather than the URL text treats every spelling of an address alike.
    answers = _resolve(host, port, timeout)
    vetted = [ipaddress.ip_address(str(sa[0]).split("%", 1)[0]) for *_, sa in answers]
    for ip in vetted:
        if not (any(ip in net for net in limits.allow_networks) or is_public_address(ip)):
            raise Permanent("blocked_address", f"{host} resolves to {ip}")
    return host, port, str(vetted[0])


class Client:
    """What the fetches of one process share: the TLS settings, read once.

    No connection outlives its request, no proxy from the environment is used, no cookie is
    kept: requests go to IP literals, so a pool or a jar would be keyed by IP and hand one
    site's connection or cookies to another site behind the same address (a CDN)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._tls = tls

    def tls(self) -> ssl.SSLContext:
        """The context that verifies certificates: certifi's roots unless one was given."""
        if self._tls is None:  # loading the roots costs milliseconds: only once, and only for https
            self._tls = ssl.create_default_context(cafile=certifi.where())
        return self._tls

    def close(self) -> None:
        """Nothing is held open between fetches; kept so a Client reads like any client."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_client(*, tls: ssl.SSLContext | None = None) -> Client:
    """The client one process reuses for its fetches (`tls`: trust other roots, as tests do)."""
    return Client(tls)


class _Watchdog:
    """Shuts the live socket at the deadline: per-read timeouts cannot stop a slow drip."""

    def __init__(self, deadline_at: float) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.expired = False
        self.deadline_at = deadline_at
        self.done = False
        _DEADLINES.watch(self)

    def attach(self, sock: socket.socket) -> None:
        """Watch this socket from now on (the plain one, then its TLS wrapper)."""
        with self._lock:
            self._sock = sock
            if self.expired:
                _shut(sock)

    def expire(self) -> None:
        """The deadline passed while the fetch was still running: cut its socket."""
        with self._lock:
            if not self.done:
                self.expired = True
                _shut(self._sock)

    def cancel(self) -> None:
        """The fetch is over: its socket is no longer the watchdog's business."""
        with self._lock:
            self.done = True
            self._sock = None


class _Deadlines:
    """One thread per process that expires the watchdogs of fetches past their deadline.

    A Timer thread per fetch cost a thread start and a wake-up per article; here a fetch only
    pushes onto a heap. Deadlines are mostly pushed in order (the same limit from a later
    start), so the thread is woken only when a new deadline comes first."""

    def __init__(self) -> None:
        self._reset()
        # Threads do not survive a fork, and a lock held at the fork would stay held.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Watchdog]] = []
        self._order = itertools.count()
        self._started = False

    def watch(self, dog: _Watchdog) -> None:
        """Expire `dog` at its deadline unless it is cancelled first."""
        with self._cond:
            if not self._started:
                self._started = True
                threading.Thread(target=self._run, name="talkwire-fetch-deadlines",
                                 daemon=True).start()
            heapq.heappush(self._heap, (dog.deadline_at, next(self._order), dog))
            if self._heap[0][2] is dog:
                self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].done or self._heap[0][0] <= now):
                    heapq.heappop(self._heap)[2].expire()  # a no-op once cancelled
                self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)


_DEADLINES = _Deadlines()


def _shut(sock: socket.socket | None) -> None:
    """Shut a socket down from another thread; its blocked reader then sees EOF."""
    try:
        # The plain-socket method: SSLSocket.shutdown would unwrap TLS under the reader's feet.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # type: ignore[arg-type]
    except (OSError, TypeError):
        pass  # already closed, or no socket yet


class _Decoder:
    """Inflates gzip/deflate with an output budget, so a bomb never expands past the cap."""

    def __init__(self, header: str) -> None:
        codings = [c.strip().lower() for c in header.split(",")]
        codings = [c for c in codings if c not in ("", "identity")]
        # Stacked codings multiply a bomb's ratio per layer; one gzip/deflate layer is all we ask.
        if len(codings) > 1 or (codings and codings[0] not in ("gzip", "x-gzip", "deflate")):
            raise Permanent("bad_encoding", f"unsupported Content-Encoding {header!r}")
        self._coding = codings[0] if codings else None
        self._z: Any = None

    def feed(self, data: bytes, budget: int) -> bytes:
        """Decode one raw chunk into at most `budget` bytes."""
        if self._coding is None:
            return data
        if self._z is None:  # "deflate" should be zlib-wrapped; some servers send it raw
            wrapped = len(data) > 1 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            deflate = zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS if "gzip" in self._coding else deflate)
        try:
            out: bytes = self._z.decompress(data, budget)
            while self._z.unconsumed_tail and len(out) < budget:
                out += self._z.decompress(self._z.unconsumed_tail, budget - len(out))
            return out
        except zlib.error as exc:
            raise Permanent("bad_encoding", f"corrupt {self._coding} body: {exc}") from exc

    def flush(self) -> bytes:
        """Return what the decompressor still holds once the input is exhausted."""
        return bytes(self._z.flush()) if self._z is not None else b""


def _retry_after(value: str | None) -> float | None:
    """Parse Retry-After as delta-seconds or an HTTP-date; None when absent or unreadable."""
    value = (value or "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class _Response(http.client.HTTPResponse):
    """A response that passes over interim answers (103 Early Hints, 102 Processing), as
    http.client already passes over 100 Continue, instead of taking one for the answer."""

    def _read_status(self) -> tuple[str, int, str]:
        while True:
            version, status, reason = super()._read_status()  # type: ignore[misc]
            if not 101 < status < 200:
                return version, status, reason
            http.client.parse_headers(self.fp)  # the interim answer's fields, unused


def _header(response: http.client.HTTPResponse, name: str) -> str | None:
    """A response header's value, repeated fields joined with commas (RFC 9110 5.3)."""
    values = response.headers.get_all(name)
    return ", ".join(values) if values else None


def _utf8_header(value: str) -> str:
    """A header value as UTF-8 where its bytes are UTF-8: http.client reads every header as
    Latin-1, and sites with Arabic or Cyrillic slugs send raw UTF-8 in Location."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def _raise_for_status(response: http.client.HTTPResponse, url: str) -> None:
    """Map a status that is neither 2xx nor 304 to Permanent or Transient."""
    code = response.status
    if 200 <= code < 300 or code == 304:
        return
    if code in (429, 503):
        retry = _retry_after(_header(response, "retry-after"))
        raise Transient(f"http_{code}", url, retry_after=retry)
    raise (Transient if code >= 500 or code == 408 else Permanent)(f"http_{code}", url)


# What a connection can raise while it is read: the socket's errors (timeouts, resets, TLS),
# http.client's protocol errors, and ValueError for a chunk size that is not a number.
_WIRE_ERRORS = (OSError, http.client.HTTPException, ValueError)


def _transport_error(exc: Exception, watchdog: _Watchdog) -> Transient:
    """Classify a failure on the wire; one forced by the watchdog is a timeout, not a lost
    peer."""
    late = watchdog.expired or isinstance(exc, TimeoutError)
    return Transient("timeout" if late else "connect_error", str(exc) or type(exc).__name__)


def _connect(client: Client, scheme: str, host: str, ip: str, port: int, timeout: float,
             watchdog: _Watchdog) -> socket.socket:
    """A socket to the vetted IP; for https, verified TLS with the real name in SNI."""
    sock = socket.create_connection((ip, port), timeout=timeout)
    watchdog.attach(sock)
    if scheme != "https":
        return sock
    try:
        # The handshake waits until the watchdog holds the wrapper: wrapping takes the file
        # descriptor away from the plain socket object. Verification follows SNI, not the IP.
        tls = client.tls().wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    watchdog.attach(tls)
    try:
        tls.do_handshake()
    except BaseException:
        tls.close()
        raise
    return tls


def _send(client: Client, url: str, limits: FetchLimits, headers: dict[str, str],
          deadline_at: float, watchdog: _Watchdog) -> http.client.HTTPResponse:
    """Vet one hop and send it to the vetted IP, with the real name in Host and TLS SNI."""
    host, port, ip = check_url(url, limits, timeout=max(0.0, deadline_at - time.monotonic()))
    left = deadline_at - time.monotonic()
    if left <= 0:
        raise Transient("timeout", "deadline passed before the request was sent")
    parts = urlsplit(url)
    target = quote(parts.path or "/", safe=_TARGET_SAFE) + (
        f"?{quote(parts.query, safe=_TARGET_SAFE)}" if parts.query else "")
    host_header = (f"[{host}]" if ":" in host else host) + (
        "" if port == _DEFAULT_PORTS[parts.scheme] else f":{port}")
    sent = {"Host": host_header, **headers}
    if parts.username is not None:  # credentials in the URL go to that URL's host alone
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        sent["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
    try:
        sock = _connect(client, parts.scheme, host, ip, port, min(limits.connect_timeout, left),
                        watchdog)
    except _WIRE_ERRORS as exc:
        raise _transport_error(exc, watchdog) from exc
    conn = http.client.HTTPConnection(ip, port)
    conn.response_class = _Response
    conn.sock = sock  # connected above: http.client only writes the request and reads
    try:
        sock.settimeout(min(limits.read_timeout, left))  # for each read and write
        conn.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
        for name, value in sent.items():
            conn.putheader(name, value)
        conn.endheaders()
        return conn.getresponse()  # the response owns the socket from here
    except http.client.InvalidURL as exc:
        conn.close()
        raise Permanent("bad_url", f"{url!r}: {exc}") from exc
    except _WIRE_ERRORS as exc:
        conn.close()
        raise _transport_error(exc, watchdog) from exc


def _read_body(response: http.client.HTTPResponse, limits: FetchLimits, deadline_at: float,
               watchdog: _Watchdog) -> bytes:
    """Stream and decode the body, stopping at the byte cap or the deadline."""
    declared = (_header(response, "content-length") or "").strip()
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise Permanent("too_large", f"Content-Length {declared} > {limits.max_bytes}")
    decoder = _Decoder(_header(response, "content-encoding") or "")
    chunks: list[bytes] = []
    total = 0
    try:
        # Bytes as sent (chunking undone, Content-Encoding not), decoded here under a budget,
        # so a bomb is cut when its output passes the cap rather than after it inflated.
        while raw := response.read1(65536):
            chunks.append(decoder.feed(raw, limits.max_bytes - total + 1))
            total += len(chunks[-1])
            if total > limits.max_bytes:
                raise Permanent("too_large", f"body exceeds {limits.max_bytes} bytes")
            if time.monotonic() > deadline_at:
                raise Transient("timeout", "deadline passed while reading the body")
        chunks.append(decoder.flush())
    except _WIRE_ERRORS as exc:
        raise _transport_error(exc, watchdog) from exc
    if total + len(chunks[-1]) > limits.max_bytes:
        raise Permanent("too_large", f"body exceeds {limits.max_bytes} bytes")
    if watchdog.expired:  # a body delimited by close looks complete when the watchdog cut it
        raise Transient("timeout", "deadline passed while reading the body")
    if response.length:  # http.client returns a body cut short by the peer without a word
        raise Transient("connect_error", f"the body ended {response.length} bytes short of "
                        "its Content-Length")
    return b"".join(chunks)


def fetch_url(url: str, limits: FetchLimits, *, etag: str | None = None,
              last_modified: str | None = None, client: Client | None = None,
              accept: str | None = None) -> Page:
    """Fetch one URL under the SSRF, deadline, size and redirect limits; raise on failure."""
    started = time.monotonic()
    deadline_at = started + limits.deadline
    headers = {"User-Agent": limits.user_agent, "Accept": accept or "*/*",
               "Accept-Encoding": "gzip, deflate",  # only what _Decoder can bound
               "Connection": "close"}  # one request per connection (Client)
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    session = client if client is not None else make_client()
    watchdog = _Watchdog(deadline_at)
    current, seen = url, {url.split("#", 1)[0]}
    hops: list[tuple[int, str]] = []  # (status, target) per redirect followed
    try:
        while True:
            response = _send(session, current, limits, headers, deadline_at, watchdog)
            try:
                if response.status not in _REDIRECTS:
                    _raise_for_status(response, current)
                    body = b"" if response.status == 304 else _read_body(
                        response, limits, deadline_at, watchdog)
                    break
                location = _utf8_header(_header(response, "location") or "").strip()
                if not location:
                    raise Permanent("bad_redirect", f"{response.status} without Location")
                target = urljoin(current, location)  # relative Locations resolve against the hop
                if target.split("#", 1)[0] in seen:
                    raise Permanent("redirect_loop", f"{current} -> {target}")
                if len(hops) >= limits.max_redirects:
                    raise Permanent("too_many_redirects", f"more than {limits.max_redirects}")
                hops.append((response.status, target))
                seen.add(target.split("#", 1)[0])
                current = target
            finally:
                response.close()
    finally:
        watchdog.cancel()
    media_type = (_header(response, "content-type") or "").split(";", 1)[0].strip().lower()
    permanent = bool(hops) and all(code in (301, 308) for code, _ in hops)
    return Page(
        url=url, final_url=current, status=response.status, body=body,
        content_type=media_type or None, charset=response.headers.get_content_charset(),
        etag=_header(response, "etag"), last_modified=_header(response, "last-modified"),
        cache_control=_header(response, "cache-control"), expires=_header(response, "expires"),
        retry_after=_header(response, "retry-after"), moved_to=current if permanent else None,
        redirects=tuple(u for _, u in hops), elapsed=time.monotonic() - started,
    )
