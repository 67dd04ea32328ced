"""Feed bytes to typed entries (feedparser, plus JSON Feed), and the arithmetic of when to poll.

feedparser is only ever handed bytes that talkwire fetched itself: given a string it would
treat it as a path or URL and open it (feedparser#148), which would bypass the SSRF guard.
feedparser does not read JSON Feed (jsonfeed.org), so a few lines here do.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import random
import re
from collections.abc import Iterable
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin

import feedparser

from worker.errors import Permanent
from worker.types import FeedEntry, ParsedFeed
from worker.xmlguard import refuse_entity_declarations

RETRY_AFTER_CAP = 86_400
# RSS sy:updatePeriod values in minutes (RDF Site Summary 1.0 syndication module).
_UPDATE_PERIOD_MINUTES = {"hourly": 60, "daily": 1440, "weekly": 10080, "monthly": 43200, "yearly": 525600}
_JSON_FEED_VERSION = "https://jsonfeed.org/version/"
_JSON_TYPES = frozenset({"application/feed+json", "application/json"})
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)", re.IGNORECASE)


def parse_feed(body: bytes, *, base_url: str, content_type: str | None = None) -> ParsedFeed:
    """Parse a fetched feed body; raise Permanent('not_a_feed') when it holds no feed."""
    if not isinstance(body, bytes):  # guard the feedparser trap at the boundary
        raise TypeError("parse_feed takes the fetched bytes, never a str")
    refuse_entity_declarations(body)  # before feedparser expands them (issue 8)
    if content_type in _JSON_TYPES or body.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{":
        return _parse_json_feed(body, base_url)
    # No Content-Location: given one, feedparser resolves every URI-ish element against it,
    # GUIDs included, which costs a third of the parse and makes a relative GUID change when
    # the feed moves (a 301). Links are made absolute below; xml:base is still honoured.
    headers = {"content-type": content_type} if content_type else {}
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
        format=parsed.get("version") or None,
    )


def _parse_json_feed(body: bytes, base_url: str) -> ParsedFeed:
    """JSON Feed 1.0/1.1 (https://jsonfeed.org/version/1.1) into the same typed values."""
    try:
        doc = json.loads(body)  # bytes: json detects UTF-8/16/32 itself (RFC 8259 section 8.1)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise Permanent("not_a_feed", f"invalid JSON: {exc}") from exc
    if not (isinstance(doc, dict) and str(doc.get("version", "")).startswith(_JSON_FEED_VERSION)
            and isinstance(doc.get("items"), list)):
        raise Permanent("not_a_feed", "JSON without a JSON Feed version and items")
    entries = []
    for item in doc["items"]:
        if not isinstance(item, dict):
            continue
        guid = item.get("id")
        entries.append(FeedEntry(
            # 1.1 says id is a string; 1.0 feeds in the wild send numbers.
            guid=_clean(str(guid)) if isinstance(guid, (str, int)) else None,
            url=_absolute(item.get("url"), base_url) or _absolute(item.get("external_url"), base_url),
            title=_clean(item.get("title")),
            published=_iso_datetime(item.get("date_published") or item.get("date_modified")),
            summary=_clean(item.get("summary")) or _clean(item.get("content_text")),
        ))
    return ParsedFeed(title=_clean(doc.get("title")), link=_absolute(doc.get("home_page_url"), base_url),
                      entries=tuple(entries), format="json" + str(doc["version"]).rsplit("/", 1)[-1])


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


def _iso_datetime(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.strip())  # RFC 3339, as JSON Feed requires
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


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


def feed_hint_seconds(feed: ParsedFeed) -> int | None:
    """The pace the publisher asks for (RSS <ttl>, sy:updatePeriod) in seconds, or None."""
    hint = max(feed.ttl_minutes or 0, feed.update_period_minutes or 0) * 60
    return hint or None


def cache_lifetime(cache_control: str | None, expires: str | None, *, now: datetime) -> int | None:
    """Seconds a response stays fresh by Cache-Control max-age, else Expires; None if unsaid."""
    # RFC 9111 section 5.2.2.1: max-age wins over Expires. no-store and no-cache say nothing
    # about how long to wait, so they set no floor.
    if cache_control:
        lowered = cache_control.lower()
        if "no-store" in lowered or "no-cache" in lowered:
            return None
        match = _MAX_AGE.search(cache_control)
        if match:
            return int(match.group(1)) or None
    if expires:
        try:
            when = parsedate_to_datetime(expires)
        except (TypeError, ValueError):
            return None  # RFC 9111 section 5.3: an unreadable Expires means already stale
        when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
        seconds = int((when - now).total_seconds())
        return seconds if seconds > 0 else None
    return None


def entry_window(entries: Iterable[FeedEntry], *, now: datetime) -> int | None:
    """Seconds between the oldest and newest dated entry (future dates ignored), or None."""
    dates = sorted(e.published for e in entries if e.published is not None and e.published <= now)
    if len(dates) < 2:
        return None
    return int((dates[-1] - dates[0]).total_seconds()) or None


def next_poll_interval(*, current: int, new_entries: int, total_entries: int, minimum: int,
                       maximum: int, since_last_success: float | None = None,
                       window_seconds: int | None = None, ttl_seconds: int | None = None,
                       cache_seconds: int | None = None) -> tuple[int, str]:
    """The next interval in seconds for a feed that answered, and the reason it was chosen.

    A 304 or an unchanged body is new_entries=0, total_entries=0.
    """
    interval, reason = current, "unchanged"
    if since_last_success is None:
        # Everything looks new on a first poll; that says nothing about the feed's pace.
        reason = "first_poll"
    elif new_entries <= 0.1 * total_entries:
        # Overlap rule, lengthen: (almost) nothing new. Not after an early poll (an operator's
        # `feeds poll`), which proves nothing (mediacloud/rss-fetcher _check_auto_adjust).
        if since_last_success < current / 2:
            reason = "early"
        else:
            interval, reason = int(current * 1.5), "few_new"
    elif new_entries >= 0.5 * total_entries:
        # Overlap rule, shorten: most of it is new, so items may have scrolled off unseen.
        # Not after a late poll (an outage, a backlog): the delay explains the new items.
        if since_last_success > current * 2:
            reason = "late"
        else:
            interval, reason = current // 2, "mostly_new"
    if window_seconds and window_seconds >= 2 * minimum and interval > window_seconds // 2:
        # The entries span window_seconds; polling at half that keeps an overlap even when the
        # overlap rule has not yet caught up (the commonest cause of missed items).
        interval, reason = window_seconds // 2, "window"
    # The publisher's pacing is a floor: RSS 2.0 <ttl>, sy:updatePeriod, HTTP freshness.
    if (ttl_seconds or 0) > interval and (ttl_seconds or 0) >= (cache_seconds or 0):
        interval, reason = int(ttl_seconds or 0), "feed_ttl"
    elif (cache_seconds or 0) > interval:
        interval, reason = int(cache_seconds or 0), "cache_max_age"
    clamped = max(minimum, min(maximum, interval))
    if clamped != interval:
        reason = f"{reason}:clamped"
    return clamped, reason


def jittered(seconds: int, fraction: float, rng: random.Random | None = None) -> int:
    """The delay before a poll: the interval plus up to `fraction` of it, never less."""
    # Only later, never sooner: the interval may already be the floor a publisher asked for.
    draw = rng.random() if rng is not None else random.random()
    return seconds + int(seconds * fraction * draw)


def failure_backoff(*, failures: int, base: int, cap: int, retry_after: float | None) -> int:
    """Seconds to wait after the given number of consecutive failures; never gives up."""
    delay = min(cap, base * (2 ** min(failures, 20)))
    if retry_after is not None:
        # Honour Retry-After (RFC 9110 section 10.2.3), but a hostile or broken server must
        # not be able to park a feed for months.
        delay = max(delay, min(int(retry_after), RETRY_AFTER_CAP))
    return max(1, delay)
