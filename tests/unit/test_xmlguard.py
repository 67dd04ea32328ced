"""Entity declarations are refused before feedparser sees a feed (issue 8)."""

from __future__ import annotations

import pytest

from worker.errors import Permanent
from worker.poll import parse_feed
from worker.xmlguard import refuse_entity_declarations

PLAIN = (b'<?xml version="1.0"?><!DOCTYPE rss PUBLIC "-//Netscape Communications//DTD RSS 0.91//EN"'
         b' "http://my.netscape.com/publish/formats/rss-0.91.dtd"><rss version="0.91"><channel>'
         b"<title>D\xc3\xa9p\xc3\xaaches</title><item><title>Astana</title><link>http://news.example/a</link>"
         b"</item></channel></rss>")
ENTITY = '<!DOCTYPE rss [<!ENTITY a "aaaa">]><rss version="2.0"><channel/></rss>'


@pytest.mark.parametrize("body", [
    ENTITY.encode(), ENTITY.encode("utf-16-le"), ENTITY.encode("utf-16-be"),
    ENTITY.encode("utf-32-le"), b"\xef\xbb\xbf" + ENTITY.encode(),
    b'<!DOCTYPE rss [<!ENTITY % p SYSTEM "http://169.254.169.254/">%p;]><rss/>',
])
def test_any_entity_declaration_is_refused(body: bytes) -> None:
    with pytest.raises(Permanent) as info:
        parse_feed(body, base_url="http://news.example/feed")
    assert info.value.reason == "xml_entities"


def test_a_doctype_without_entities_still_parses() -> None:
    refuse_entity_declarations(PLAIN)
    feed = parse_feed(PLAIN, base_url="http://news.example/feed")
    assert [e.url for e in feed.entries] == ["http://news.example/a"]
