"""Frozen values that cross stage boundaries.

Untyped library output (feedparser dicts, trafilatura documents, HTTP responses) is turned
into these at the edge, so the stages after it never see a library type.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import datetime

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class FetchLimits:
    """What one fetch may cost: time, bytes, hops, and which private networks are admitted."""

    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    deadline: float = 30.0
    max_bytes: int = 5 * 1024 * 1024
    max_redirects: int = 5
    allow_networks: tuple[IPNetwork, ...] = ()
    user_agent: str = "talkwire/0.1 (+https://github.com/talkwire)"


@dataclass(frozen=True)
class Page:
    """A fetched HTTP response body with the headers the later stages need."""

    url: str
    final_url: str
    status: int
    body: bytes
    content_type: str | None = None
    charset: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    cache_control: str | None = None
    expires: str | None = None
    retry_after: str | None = None
    # Set when every hop to final_url was a permanent redirect (301/308), so a feed's stored
    # URL can follow it; a 302 in the chain leaves it None.
    moved_to: str | None = None
    redirects: tuple[str, ...] = ()
    elapsed: float = 0.0

    @property
    def not_modified(self) -> bool:
        """True when the server answered a conditional GET with 304."""
        return self.status == 304


@dataclass(frozen=True)
class FeedEntry:
    """One item of a feed, reduced to what identifies and locates it."""

    guid: str | None
    url: str | None
    title: str | None
    published: datetime | None
    summary: str | None = None


@dataclass(frozen=True)
class ParsedFeed:
    """A feed document after parsing: its metadata hints and its entries."""

    title: str | None
    link: str | None
    entries: tuple[FeedEntry, ...]
    ttl_minutes: int | None = None
    update_period_minutes: int | None = None
    bozo_reason: str | None = None
    format: str | None = None  # feedparser's version (rss20, atom10, rss10, ...) or json1


@dataclass(frozen=True)
class Article:
    """Clean text and metadata extracted from one article page."""

    url: str
    title: str | None
    text: str
    published: datetime | None = None
    author: str | None = None
    site_name: str | None = None
    language: str | None = None
    canonical_url: str | None = None
    description: str | None = None
    extractor: str = "trafilatura"
    warnings: tuple[str, ...] = field(default=())
