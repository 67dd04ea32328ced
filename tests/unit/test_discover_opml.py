"""Pure helpers of `feeds add` and `feeds import/export`: feed links in HTML, OPML in and out."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.discover import find_feed_links
from worker.errors import Permanent
from worker.opml import OpmlFeed, read_opml, write_opml

REPO = Path(__file__).resolve().parents[2]
SITE = REPO / "tests" / "fixtures" / "site"


def test_alternate_feed_links_are_found_absolute_once_each() -> None:
    html = (SITE / "discover" / "index.html").read_bytes()
    assert find_feed_links(html, "http://news.example/discover/") == [
        "http://news.example/feeds/wire-en.xml",
        "http://news.example/feeds/depeches-fr.atom",
    ]


def test_a_base_element_moves_relative_links() -> None:
    html = b'<html><head><base href="https://cdn.example/a/"><link rel="alternate" ' \
           b'type="application/feed+json" href="feed.json"></head></html>'
    assert find_feed_links(html, "http://news.example/") == ["https://cdn.example/a/feed.json"]


@pytest.mark.parametrize("html", [b"", b"not html at all", (SITE / "bare" / "index.html").read_bytes(),
                                  b'<link rel="alternate" type="application/rss+xml" href="javascript:x">'])
def test_pages_without_feed_links(html: bytes) -> None:
    assert find_feed_links(html, "http://news.example/") == []


def test_the_shipped_opml_skips_commented_outlines() -> None:
    data = (REPO / "seeds" / "feeds.opml").read_bytes()
    feeds = read_opml(data)
    assert feeds and all(f.url.startswith("https://") for f in feeds)
    assert "http://feeds.reuters.com/Reuters/worldNews" not in {f.url for f in feeds}  # commented
    assert feeds[0].category == "Wire services"


def test_opml_round_trips() -> None:
    feeds = [OpmlFeed("https://a.example/rss?x=1&y=2", "Вестник", "https://a.example/", "Wire/RU"),
             OpmlFeed("https://b.example/atom", None, None, None)]
    assert read_opml(write_opml(feeds, title="t")) == feeds


@pytest.mark.parametrize("data", [b"<html/>", b"<opml><body><outline", b'<?xml version="1.0"?>\n'
                                  b'<!DOCTYPE opml [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                                  b'<opml><body><outline xmlUrl="&x;"/></body></opml>'])
def test_broken_or_hostile_opml(data: bytes) -> None:
    try:
        feeds = read_opml(data)
    except Permanent as exc:
        assert exc.reason == "bad_opml"
        return
    assert all("root:" not in f.url for f in feeds)  # an external entity is never read
