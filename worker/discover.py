"""Find a site's feeds from any URL: the URL itself, the `<link rel="alternate">` feeds its HTML
page announces, then the paths where CMSs usually put one.

Every candidate goes through the same SSRF-safe fetcher and the same parser as a poll, so a
feed is only reported when talkwire could actually poll it.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import lxml.html
from lxml import etree

from worker.errors import Permanent, Transient
from worker.fetch import Client, fetch_url
from worker.poll import parse_feed
from worker.types import FetchLimits

# Types a page uses to announce a feed (RSS Autodiscovery; RFC 4287 for Atom; JSON Feed 1.1).
FEED_TYPES = frozenset({"application/rss+xml", "application/atom+xml", "application/rdf+xml",
                        "application/feed+json", "application/json", "application/xml",
                        "text/xml"})
# Tried in order when a page announces nothing: WordPress, generic, Ghost/Hugo, Blogger.
COMMON_PATHS = ("/feed", "/rss", "/feed.xml", "/rss.xml", "/atom.xml", "/index.xml",
                "/feeds/posts/default")
_ACCEPT = ("application/rss+xml, application/atom+xml, application/feed+json, "
           "text/html;q=0.9, application/xml;q=0.9, */*;q=0.5")


@dataclass(frozen=True)
class FoundFeed:
    """A feed that was fetched and parsed: where it lives and what it calls itself."""

    url: str
    title: str | None
    site_url: str | None
    format: str | None
    how: str  # given | alternate | common_path


def find_feed_links(html: bytes, base_url: str) -> list[str]:
    """Feed URLs a page announces with <link rel="alternate" type=...>, absolute, in page order."""
    try:
        doc = lxml.html.document_fromstring(html)
    except (etree.ParserError, ValueError):
        return []  # empty or not HTML at all
    base = base_url
    for href in doc.xpath("//base/@href"):
        base = urljoin(base_url, href.strip())
        break
    found: list[str] = []
    for link in doc.xpath("//link[@href]"):
        rels = (link.get("rel") or "").lower().split()
        media = (link.get("type") or "").split(";", 1)[0].strip().lower()
        if "alternate" in rels and media in FEED_TYPES:
            url = urljoin(base, link.get("href").strip())
            if urlsplit(url).scheme in ("http", "https") and url not in found:
                found.append(url)
    return found


def _try_feed(url: str, limits: FetchLimits, client: Client, how: str) -> FoundFeed | None:
    try:
        page = fetch_url(url, limits, client=client, accept=_ACCEPT)
        feed = parse_feed(page.body, base_url=page.final_url, content_type=page.content_type)
    except (Permanent, Transient):
        return None
    return FoundFeed(page.final_url, feed.title, feed.link, feed.format, how)


def discover_feeds(url: str, limits: FetchLimits, *, client: Client) -> list[FoundFeed]:
    """The feeds reachable from url: itself if it is one, else the ones its page announces,
    else the first common path that holds one. Raises when url itself cannot be fetched."""
    page = fetch_url(url, limits, client=client, accept=_ACCEPT)
    try:
        feed = parse_feed(page.body, base_url=page.final_url, content_type=page.content_type)
        return [FoundFeed(page.final_url, feed.title, feed.link, feed.format, "given")]
    except Permanent:
        pass
    found = [hit for link in find_feed_links(page.body, page.final_url)
             if (hit := _try_feed(link, limits, client, "alternate")) is not None]
    if found:
        return found
    for path in COMMON_PATHS:
        hit = _try_feed(urljoin(page.final_url, path), limits, client, "common_path")
        if hit is not None:
            return [hit]
    return []
