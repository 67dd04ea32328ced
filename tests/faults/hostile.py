"""The hostile web for the fault suite: routes for serve_site that misbehave on purpose.

Every body here is written for these tests (news-like text in several languages about the
talks); the attacks are the classic ones, built in code so their size is exact.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler

Route = Callable[[BaseHTTPRequestHandler, str], None]

# One paragraph per language, used to build pages that have real text around the attack.
PARAGRAPHS = {
    "fr": ("Les délégations se sont retrouvées à Genève pour un nouveau cycle de discussions "
           "sur la Constitution ; l'envoyé spécial a salué « un climat de travail sérieux » "
           "malgré les désaccords sur l'ordre du jour et le calendrier des réunions."),
    "de": ("Die Delegationen trafen sich in Astana zur vierten Gesprächsrunde über die "
           "Waffenruhe; Beobachter sprachen von schwierigen, aber sachlichen Verhandlungen "
           "über Deeskalationszonen und den Austausch von Gefangenen."),
    "ar": ("اجتمعت الوفود في جنيف لجولة جديدة من محادثات اللجنة الدستورية، وقال المبعوث "
           "الخاص إن الأجواء كانت جدية رغم الخلاف حول جدول الأعمال ومواعيد الاجتماعات المقبلة."),
    "ru": ("Делегации собрались в Астане на очередной раунд переговоров; стороны обсудили "
           "режим прекращения огня, зоны деэскалации и обмен задержанными, сообщили источники."),
    "en": ("Delegations gathered in Geneva for another session of the Constitutional "
           "Committee; the special envoy described a serious working atmosphere despite "
           "disagreements over the agenda and the timetable of future meetings."),
}


def page_html(lang: str, title: str, inner: str = "", repeat: int = 4) -> str:
    """A small article page in one language, with `inner` placed before its paragraphs."""
    paragraphs = "".join(f"<p>{PARAGRAPHS[lang]}</p>" for _ in range(repeat))
    return (f'<!DOCTYPE html><html lang="{lang}"><head><title>{title}</title></head><body>'
            f"<nav><a href='/'>Accueil</a></nav><article><h1>{title}</h1>{inner}{paragraphs}"
            f"</article></body></html>")


def send(handler: BaseHTTPRequestHandler, body: bytes, *, ctype: str = "text/html",
         headers: dict[str, str] | None = None, length: int | None = None) -> None:
    """Answer 200 with a body and headers; `length` overrides the Content-Length (lies)."""
    handler.send_response(200)
    handler.send_header("Content-Type", ctype)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    handler.end_headers()
    try:
        handler.wfile.write(body)
    except OSError:
        pass  # the client hung up at its cap: the point of the test


def static(body: bytes, **kwargs: object) -> Route:
    """A route that always serves these bytes."""
    return lambda handler, base: send(handler, body, **kwargs)  # type: ignore[arg-type]


def many_sections(lang: str, title: str, sections: int = 12, paragraphs: int = 1900) -> str:
    """A page of many short paragraphs in many sections: under every size and sibling cap,
    yet trafilatura walks it in Python for seconds (about 13 s on the test machine;
    the time grows faster than the text)."""
    inner = "".join("<section>" + "".join(
        f"<p>Delegates met in Geneva again, session {s}.{i}.</p>" for i in range(paragraphs))
        + "</section>" for s in range(sections))
    return page_html(lang, title, inner)


def first_then(first: Route, then: Route) -> Route:
    """A route that answers its first request with `first` and every later one with `then`."""
    served = threading.Event()

    def handle(handler: BaseHTTPRequestHandler, base: str) -> None:
        route = then if served.is_set() else first
        served.set()
        route(handler, base)

    return handle


def redirect(location: str | Callable[[str], str], status: int = 302) -> Route:
    """A route that redirects; a callable location gets the site's base URL."""

    def handle(handler: BaseHTTPRequestHandler, base: str) -> None:
        handler.send_response(status)
        handler.send_header("Location", location(base) if callable(location) else location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return handle


def drip(interval: float) -> Route:
    """Headers at once, then one byte of body every `interval` seconds, for ever."""

    def handle(handler: BaseHTTPRequestHandler, base: str) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/html; charset=utf-8")
        handler.send_header("Content-Length", "1000000")
        handler.end_headers()
        try:
            while True:
                handler.wfile.write(b"<")
                handler.wfile.flush()
                time.sleep(interval)
        except OSError:
            return

    return handle


def silent(handler: BaseHTTPRequestHandler, base: str) -> None:
    """Accept the request and say nothing until the client gives up."""
    try:
        while handler.rfile.read(1):
            pass
    except OSError:
        return


def endless_chunked(handler: BaseHTTPRequestHandler, base: str) -> None:
    """A chunked body that never ends."""
    handler.send_response(200)
    handler.send_header("Content-Type", "text/html; charset=utf-8")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    chunk = b"<p>" + PARAGRAPHS["en"].encode() * 40 + b"</p>"
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    try:
        while True:
            handler.wfile.write(frame)
    except OSError:
        return


def gzip_bomb(decoded_mb: int) -> bytes:
    """A gzip body of a few kilobytes that inflates to `decoded_mb` MiB."""
    return gzip.compress(b"\0" * (decoded_mb << 20), compresslevel=9)


class Hits:
    """Counts requests per path, to prove a refused target was never contacted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.paths: list[str] = []

    def wrap(self, path: str, route: Route) -> Route:
        """The same route, counted."""

        def handle(handler: BaseHTTPRequestHandler, base: str) -> None:
            with self._lock:
                self.paths.append(path)
            route(handler, base)

        return handle
