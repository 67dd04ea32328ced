"""Pure feed parsing and scheduling arithmetic, on fixture feeds written by the team."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from worker.errors import Permanent
from worker.poll import entry_key, failure_backoff, next_poll_interval, parse_feed
from worker.types import FeedEntry

SITE = Path(__file__).resolve().parents[1] / "fixtures" / "site"
BASE = "http://news.example/feeds/x.xml"


def read(name: str) -> bytes:
    return (SITE / "feeds" / name).read_bytes().replace(b"{base}", b"http://news.example")


def test_rss2_entries_are_typed_and_absolute() -> None:
    feed = parse_feed(read("wire-en.xml"), base_url=BASE)
    assert feed.title == "Levant Wire: Diplomacy"
    assert feed.ttl_minutes == 30
    assert [e.guid for e in feed.entries] == [
        "levantwire-2017-05-02-001", "levantwire-2017-05-04-007", "levantwire-2017-05-05-002"]
    assert feed.entries[0].url == "http://news.example/pages/astana4-arrival.html"
    assert feed.entries[0].published == datetime(2017, 5, 2, 9, 15, tzinfo=timezone.utc)


def test_atom_relative_links_resolve_against_the_feed_url() -> None:
    feed = parse_feed(read("depeches-fr.atom"), base_url="http://news.example/feeds/fr.atom")
    assert len(feed.entries) == 1
    assert feed.entries[0].url == "http://news.example/pages/geneve6-cloture.html"
    assert feed.entries[0].title == "Genève : fin du sixième cycle sans percée"


def test_html_is_not_a_feed() -> None:
    page = (SITE / "pages" / "astana-festival.html").read_bytes()
    with pytest.raises(Permanent) as info:
        parse_feed(page, base_url=BASE)
    assert info.value.reason == "not_a_feed"


def test_parse_feed_refuses_strings() -> None:
    # feedparser would open a str as a path or URL itself, bypassing the fetcher.
    with pytest.raises(TypeError):
        parse_feed("/etc/passwd", base_url=BASE)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("entry", "basis_changes_with"),
    [
        (FeedEntry(guid="g1", url="http://a/1", title="t", published=None), "guid"),
        (FeedEntry(guid=None, url="http://a/1", title="t", published=None), "url"),
        (FeedEntry(guid=None, url=None, title="t", published=None), "title"),
    ],
)
def test_entry_key_falls_back_from_guid_to_link_to_title(entry: FeedEntry, basis_changes_with: str) -> None:
    key = entry_key(entry)
    assert len(key) == 32
    changed = {
        "guid": FeedEntry(guid="g2", url=entry.url, title=entry.title, published=None),
        "url": FeedEntry(guid=None, url="http://a/2", title=entry.title, published=None),
        "title": FeedEntry(guid=None, url=None, title="other", published=None),
    }[basis_changes_with]
    assert entry_key(changed) != key


@pytest.mark.parametrize(
    ("current", "new", "total", "expected", "reason"),
    [
        (900, 10, 10, 450, "mostly_new"),
        (900, 0, 10, 1350, "few_new"),
        (900, 3, 10, 900, "unchanged"),
        (200, 10, 10, 120, "mostly_new:clamped"),
        (20000, 0, 10, 21600, "few_new:clamped"),
    ],
)
def test_next_interval_follows_the_overlap_rule(current: int, new: int, total: int,
                                                expected: int, reason: str) -> None:
    assert next_poll_interval(current=current, feed=None, new_entries=new, total_entries=total,
                              minimum=120, maximum=21600) == (expected, reason)


def test_feed_ttl_is_a_floor() -> None:
    feed = parse_feed(read("wire-en.xml"), base_url=BASE)  # ttl 30 minutes
    assert next_poll_interval(current=300, feed=feed, new_entries=3, total_entries=3,
                              minimum=60, maximum=21600) == (1800, "feed_ttl")


@pytest.mark.parametrize(
    ("failures", "retry_after", "expected"),
    [(0, None, 60), (3, None, 480), (30, None, 3600), (0, 900.0, 900), (0, 10**9, 86400)],
)
def test_failure_backoff_is_capped_and_honours_retry_after(failures: int, retry_after: float | None,
                                                           expected: int) -> None:
    assert failure_backoff(failures=failures, base=60, cap=3600, retry_after=retry_after) == expected


def test_feedburner_entries_use_the_original_link_when_the_feed_names_it() -> None:
    feed = parse_feed(read("feedburner.xml"), base_url=BASE)
    assert [e.url for e in feed.entries] == [
        "http://news.example/pages/dedup/astana6-idlib-wire.html",
        # Without origLink the proxy link stays; the fetch follows its redirect.
        "http://feeds.levant-wire.example/~r/levantwire/topNews/~3/Pq7ZtY1mB2w/story01.htm",
    ]
