"""Feed bytes to typed entries, wrapping feedparser at the edge.

feedparser is only ever handed bytes that talkwire fetched itself: given a string it would
treat it as a path or URL and open it (feedparser#148), which would bypass the SSRF guard.
"""

from __future__ import annotations

import calendar
import hashlib
from datetime import datetime, timezone
from urllib.parse import urljoin

import feedparser

from worker.errors import Permanent
from worker.types import FeedEntry, ParsedFeed
from worker.xmlguard import refuse_entity_declarations

# RSS sy:updatePeriod values in minutes (RDF Site Summary 1.0 syndication module).
RETRY_AFTER_CAP = 86_400
_UPDATE_PERIOD_MINUTES = {"hourly": 60, "daily": 1440, "weekly": 10080, "monthly": 43200, "yearly": 525600}


def parse_feed(body: bytes, *, base_url: str, content_type: str | None = None) -> ParsedFeed:
    """Parse a fetched feed body; raise Permanent('not_a_feed') when it holds no feed."""
    if not isinstance(body, bytes):  # guard the feedparser trap at the boundary
        raise TypeError("parse_feed takes the fetched bytes, never a str")
    refuse_entity_declarations(body)  # before feedparser expands them (issue 8)
    headers = {"content-location": base_url}
    if content_type:
        headers["content-type"] = content_type
    parsed = feedparser.parse(body, response_headers=headers, sanitize_html=False,
                              resolve_relative_uris=False)
    bozo_reason = None
    if parsed.get("bozo"):
        exc = parsed.get("bozo_exception")
        bozo_reason = type(exc).__name__ if exc is not None else "bozo"
    if not parsed.get("version") and not parsed.entries:
        raise Permanent("not_a_feed", bozo_reason or "no feed elements found")
    feed = parsed.get("feed", {})
    entries = tuple(_to_entry(raw, base_url) for raw in parsed.entries)
    return ParsedFeed(
        title=_clean(feed.get("title")),
        link=_absolute(feed.get("link"), base_url),
        entries=entries,
        ttl_minutes=_int_or_none(feed.get("ttl")),
        update_period_minutes=_update_period(feed),
        bozo_reason=bozo_reason,
    )


def entry_key(entry: FeedEntry) -> str:
    """The stable identity of an entry: its GUID, else its link, else its title and date."""
    # Same fallback order as miniflux's rss adapter: a GUID is the publisher's own identity.
    if entry.guid:
        basis = "guid:" + entry.guid
    elif entry.url:
        basis = "url:" + entry.url
    else:
        basis = f"title:{entry.title or ''}|{entry.published.isoformat() if entry.published else ''}"
    return hashlib.sha256(basis.encode("utf-8")).hexdigest()[:32]


def _to_entry(raw: feedparser.FeedParserDict, base_url: str) -> FeedEntry:
    # A FeedBurner proxy link (/~r/.../~3/<id>/story01.htm) hides its target; the feed states
    # it in feedburner:origLink, which saves a redirect and gives dedup the real URL (issue 6).
    url = _absolute(raw.get("feedburner_origlink"), base_url) or _absolute(raw.get("link"), base_url)
    if not url:
        for link in raw.get("links", []):
            if link.get("rel", "alternate") == "alternate" and link.get("href"):
                url = _absolute(link["href"], base_url)
                break
    guid = _clean(raw.get("id"))
    return FeedEntry(
        guid=guid,
        url=url,
        title=_clean(raw.get("title")),
        published=_to_datetime(raw.get("published_parsed") or raw.get("updated_parsed")),
        summary=_clean(raw.get("summary")),
    )


def _absolute(href: object, base_url: str) -> str | None:
    if not isinstance(href, str) or not href.strip():
        return None
    return urljoin(base_url, href.strip())


def _clean(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def _to_datetime(value: object) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromtimestamp(calendar.timegm(value), tz=timezone.utc)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None


def _int_or_none(value: object) -> int | None:
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _update_period(feed: feedparser.FeedParserDict) -> int | None:
    period = _clean(feed.get("sy_updateperiod"))
    if period is None or period.lower() not in _UPDATE_PERIOD_MINUTES:
        return None
    frequency = _int_or_none(feed.get("sy_updatefrequency")) or 1
    return max(1, _UPDATE_PERIOD_MINUTES[period.lower()] // frequency)


def next_poll_interval(*, current: int, feed: ParsedFeed | None, new_entries: int,
                       total_entries: int, minimum: int, maximum: int) -> tuple[int, str]:
    """The next interval in seconds for a feed that answered, and the reason it was chosen."""
    interval, reason = current, "unchanged"
    if total_entries:
        # Overlap rule: if most of what we saw is new we may have missed items in between,
        # so poll sooner; if almost nothing is new, back off gently.
        share_new = new_entries / total_entries
        if share_new >= 0.5:
            interval, reason = current // 2, "mostly_new"
        elif share_new <= 0.1:
            interval, reason = int(current * 1.5), "few_new"
    if feed is not None:
        hint = max(feed.ttl_minutes or 0, feed.update_period_minutes or 0) * 60
        if hint > interval:
            # The publisher asked us not to come back sooner (RSS 2.0 <ttl>, sy:updatePeriod).
            interval, reason = hint, "feed_ttl"
    clamped = max(minimum, min(maximum, interval))
    if clamped != interval:
        reason = f"{reason}:clamped"
    return clamped, reason


def failure_backoff(*, failures: int, base: int, cap: int, retry_after: float | None) -> int:
    """Seconds to wait after the given number of consecutive failures; never gives up."""
    delay = min(cap, base * (2 ** min(failures, 20)))
    if retry_after is not None:
        # Honour Retry-After (RFC 9110 section 10.2.3), but a hostile or broken server must
        # not be able to park a feed for months.
        delay = max(delay, min(int(retry_after), RETRY_AFTER_CAP))
    return max(1, delay)
