"""Pure feed parsing and scheduling arithmetic, on fixture feeds written by the team."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import feedparser
import pytest

from worker.errors import Permanent
from worker.poll import (
    cache_lifetime,
    entry_key,
    entry_window,
    failure_backoff,
    feed_hint_seconds,
    jittered,
    next_poll_interval,
    parse_feed,
)
from worker.types import FeedEntry

SITE = Path(__file__).resolve().parents[1] / "fixtures" / "site"
BASE = "http://news.example/feeds/x.xml"
NOW = datetime(2017, 5, 5, 12, 0, tzinfo=timezone.utc)


def read(name: str, encoding: str = "utf-8") -> bytes:
    return (SITE / "feeds" / name).read_bytes().replace(
        "{base}".encode(encoding), "http://news.example".encode(encoding))


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


# (name, format, entries, first entry's link path, first entry's title)
FORMATS = [
    ("rss091-ar.xml", "rss091n", 3, "/ar/2017/05/02/astana-arrival.html",
     "وفد المعارضة يصل إلى أستانا قبيل الجولة الرابعة"),
    ("rss092-tr.xml", "rss092", 2, "/tr/2017/09/15/astana6-idlib.html",
     "Astana'da altıncı tur: İdlib için gerginliği azaltma bölgesi"),
    ("rdf-de.rdf", "rss10", 2, "/de/2017/07/15/genf7-ende.html",
     "Siebte Genfer Runde endet ohne Durchbruch"),
    ("cdata-en.xml", "rss20", 3, "/en/2018/01/30/sochi-congress.html",
     "Sochi congress ends with call for a constitutional committee"),
    ("relative-fr.atom", "atom10", 3, "/fr/2017/03/23/geneve5-paniers.html",
     "Genève V : les quatre « paniers » au menu"),
    ("jsonfeed-ru.json", "json1.1", 3, "/ru/2017/01/24/astana1-itogi.html",
     "В Астане завершился первый раунд встреч по Сирии"),
]


@pytest.mark.parametrize(("name", "fmt", "count", "path", "title"), FORMATS)
def test_every_feed_format_parses_to_typed_absolute_entries(name: str, fmt: str, count: int,
                                                            path: str, title: str) -> None:
    body = read("formats/" + name)
    feed = parse_feed(body, base_url="http://news.example/feeds/formats/" + name)
    assert (feed.format, len(feed.entries)) == (fmt, count)
    assert feed.entries[0].url == "http://news.example" + path
    assert feed.entries[0].title == title
    assert all(e.url and e.url.startswith("http://news.example/") for e in feed.entries)
    if not name.endswith(".json"):  # feedparser's own count is the reference
        assert count == len(feedparser.parse(body).entries)


def test_cdata_is_text_and_markup_survives_as_summary() -> None:
    feed = parse_feed(read("formats/cdata-en.xml"), base_url=BASE)
    assert feed.title == "Crossings & Corridors: Syria talks"
    assert feed.entries[1].title == 'Geneva VIII: talks "R&D" on the agenda? No — on the constitution'
    assert "<em>150-member</em>" in (feed.entries[0].summary or "")
    assert feed.ttl_minutes == 45


def test_windows_1251_feed_decodes_by_its_declared_charset() -> None:
    body = read("formats/cp1251-ru.xml", encoding="windows-1251")
    with pytest.raises(UnicodeDecodeError):
        body.decode("utf-8")
    feed = parse_feed(body, base_url=BASE, content_type="application/rss+xml")
    assert feed.title == "Региональный вестник: Сирия"
    assert feed.entries[0].title == "Лаврентьев: следующая встреча в Астане пройдёт в сентябре"
    assert feed.entries[0].published == datetime(2017, 7, 6, 8, 0, tzinfo=timezone.utc)


def test_relative_links_follow_xml_base_and_the_feed_url() -> None:
    feed = parse_feed(read("formats/relative-fr.atom"),
                      base_url="http://news.example/feeds/formats/relative-fr.atom")
    assert [e.url for e in feed.entries] == [
        "http://news.example/fr/2017/03/23/geneve5-paniers.html",
        "http://news.example/fr/archives/astana3-ouverture.html",  # entry-level xml:base
        "http://news.example/fr/2017/03/31/geneve5-cloture.html",
    ]
    rdf = parse_feed(read("formats/rdf-de.rdf"), base_url="http://news.example/feeds/formats/rdf-de.rdf")
    assert rdf.entries[1].url == "http://news.example/de/2017/07/10/genf7-auftakt.html"
    assert rdf.update_period_minutes == 30  # hourly, twice


def test_json_feed_ids_links_and_dates() -> None:
    feed = parse_feed(read("formats/jsonfeed-ru.json"), base_url="http://news.example/f.json")
    assert [e.guid for e in feed.entries] == ["bv-2017-01-24-astana1", "20170216",
                                              "bv-2017-07-05-astana5"]
    assert feed.entries[1].url == "http://news.example/ru/2017/02/16/astana2.html"
    assert feed.entries[2].url == "http://news.example/ru/2017/07/05/astana5.html"  # external_url
    assert feed.entries[0].published == datetime(2017, 1, 24, 9, 0, tzinfo=timezone.utc)
    assert feed.entries[1].summary == "Делегации согласились создать рабочую группу по обмену задержанными."


@pytest.mark.parametrize("body", [b'{"items": []}', b"{not json", b'{"version": "https://jsonfeed.org/version/1.1"}'])
def test_json_that_is_not_a_json_feed_is_not_a_feed(body: bytes) -> None:
    with pytest.raises(Permanent) as info:
        parse_feed(body, base_url=BASE, content_type="application/json")
    assert info.value.reason == "not_a_feed"


@pytest.mark.parametrize(
    ("current", "new", "total", "since", "expected", "reason"),
    [
        (900, 10, 10, 900, 450, "mostly_new"),
        (900, 0, 10, 900, 1350, "few_new"),
        (900, 0, 0, 900, 1350, "few_new"),          # a 304 or an unchanged body
        (900, 3, 10, 900, 900, "unchanged"),
        (900, 10, 10, None, 900, "first_poll"),      # all new on a first poll proves nothing
        (900, 0, 10, 120, 900, "early"),             # an operator's poll-now
        (900, 10, 10, 86400, 900, "late"),           # back from an outage: the backlog is ours
        (200, 10, 10, 200, 120, "mostly_new:clamped"),
        (20000, 0, 10, 20000, 21600, "few_new:clamped"),
    ],
)
def test_next_interval_follows_the_overlap_rule(current: int, new: int, total: int,
                                                since: float | None, expected: int,
                                                reason: str) -> None:
    assert next_poll_interval(current=current, new_entries=new, total_entries=total,
                              since_last_success=since, minimum=120,
                              maximum=21600) == (expected, reason)


def test_publisher_pacing_is_a_floor_and_our_maximum_a_ceiling() -> None:
    feed = parse_feed(read("wire-en.xml"), base_url=BASE)  # ttl 30 minutes
    ttl = feed_hint_seconds(feed)
    assert ttl == 1800
    assert next_poll_interval(current=300, new_entries=3, total_entries=3, since_last_success=300,
                              minimum=60, maximum=21600, ttl_seconds=ttl) == (1800, "feed_ttl")
    assert next_poll_interval(current=300, new_entries=3, total_entries=3, since_last_success=300,
                              minimum=60, maximum=21600, ttl_seconds=ttl,
                              cache_seconds=3600) == (3600, "cache_max_age")
    assert next_poll_interval(current=300, new_entries=3, total_entries=3, since_last_success=300,
                              minimum=60, maximum=1200,
                              ttl_seconds=ttl) == (1200, "feed_ttl:clamped")


def test_a_short_entry_window_caps_the_interval_so_items_cannot_scroll_off() -> None:
    entries = [FeedEntry(guid=str(i), url=None, title=None, published=NOW - timedelta(minutes=20 * i))
               for i in range(10)]  # ten items in three hours
    window = entry_window(entries, now=NOW)
    assert window == 3 * 3600
    assert next_poll_interval(current=14400, new_entries=1, total_entries=10,
                              since_last_success=14400, minimum=120, maximum=21600,
                              window_seconds=window) == (5400, "window")
    # Items stamped with one build time say nothing about the pace.
    assert entry_window([FeedEntry(guid="a", url=None, title=None, published=NOW)] * 5, now=NOW) is None


@pytest.mark.parametrize(
    ("cache_control", "expires", "expected"),
    [
        ("public, max-age=600", None, 600),
        ("max-age=\"300\", must-revalidate", None, 300),
        ("s-maxage=900", None, None),                       # for shared caches, not us
        ("no-cache, max-age=600", None, None),
        ("max-age=600", "Fri, 05 May 2017 14:00:00 GMT", 600),  # max-age wins (RFC 9111)
        (None, "Fri, 05 May 2017 13:00:00 GMT", 3600),
        (None, "Fri, 05 May 2017 11:00:00 GMT", None),      # already past
        (None, "0", None),                                  # invalid: stale
        (None, None, None),
    ],
)
def test_cache_lifetime(cache_control: str | None, expires: str | None, expected: int | None) -> None:
    assert cache_lifetime(cache_control, expires, now=NOW) == expected


def test_jitter_only_ever_delays_and_spreads() -> None:
    rng = random.Random(7)
    delays = [jittered(1000, 0.1, rng) for _ in range(200)]
    assert min(delays) >= 1000 and max(delays) <= 1100
    assert len(set(delays)) > 50
    assert jittered(1000, 0.0) == 1000


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
