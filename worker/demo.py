"""A small static site on 127.0.0.1 for the demo (and the tests' fixture sites).

Files under a root folder are served as they are, except that the literal `{base}` in feeds
and pages is replaced by the server's own base URL, so fixture links point back at it
whatever port it got. It answers conditional GETs with 304 like a well-behaved news site.
"""

from __future__ import annotations

import hashlib
import mimetypes
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

DEMO_ROOT = Path(__file__).resolve().parent.parent / "seeds" / "demo"
_TEMPLATED = {".xml", ".html", ".htm", ".json", ".opml", ".rss", ".atom"}
_TYPES = {".xml": "application/xml", ".rss": "application/rss+xml",
          ".atom": "application/atom+xml", ".json": "application/feed+json"}


@dataclass
class SiteServer:
    """A running site: its base URL and a way to stop it."""

    base_url: str
    server: ThreadingHTTPServer
    thread: threading.Thread

    def url(self, path: str) -> str:
        """The absolute URL of a path on this site."""
        return self.base_url + "/" + path.lstrip("/")

    def close(self) -> None:
        """Stop serving and free the port."""
        self.server.shutdown()
        self.server.server_close()


Route = Callable[[BaseHTTPRequestHandler, str], None]


def _make_handler(root: Path, base: list[str],
                  routes: Mapping[str, Route]) -> type[BaseHTTPRequestHandler]:
    resolved_root = root.resolve()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # the site is a fixture; its access log is noise

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = unquote(urlsplit(self.path).path).lstrip("/")
            if path in routes:
                routes[path](self, base[0])
                return
            target = (resolved_root / path).resolve()
            if resolved_root not in target.parents or not target.is_file():
                self.send_error(404)
                return
            body = target.read_bytes()
            if target.suffix in _TEMPLATED:
                body = body.replace(b"{base}", base[0].encode())
            etag = '"' + hashlib.sha1(body).hexdigest()[:16] + '"'
            if self.headers.get("If-None-Match") == etag:
                self.send_response(304)
                self.send_header("ETag", etag)
                self.end_headers()
                return
            ctype = _TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0]
            self.send_response(200)
            self.send_header("Content-Type", f"{ctype or 'application/octet-stream'}; charset=utf-8"
                             if target.suffix in _TEMPLATED else (ctype or "application/octet-stream"))
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", etag)
            self.end_headers()
            self.wfile.write(body)

    return Handler


def serve_site(root: Path, *, host: str = "127.0.0.1", port: int = 0,
               routes: Mapping[str, Route] | None = None) -> SiteServer:
    """Serve the files under root on host:port (0 picks a free port) in a daemon thread.

    `routes` maps a path (no leading slash) to a handler for dynamic responses (redirects,
    slow or failing pages); it receives the request handler and the site's base URL.
    """
    base: list[str] = [""]
    # The caller's own mapping (even empty), so routes it adds after start are served too.
    handler = _make_handler(root, base, {} if routes is None else routes)
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    base[0] = f"http://{host}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="talkwire-site", daemon=True)
    thread.start()
    return SiteServer(base_url=base[0], server=server, thread=thread)


def demo_feed_paths(root: Path = DEMO_ROOT) -> list[str]:
    """The demo's feed files, relative to its root."""
    return sorted(p.relative_to(root).as_posix() for p in (root / "feeds").glob("*.xml"))
