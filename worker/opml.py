"""OPML 2.0 (http://opml.org/spec2.opml) in and out: the feed lists operators trade.

Outlines inside XML comments are not outlines, so a list can keep disabled feeds as comments
(seeds/feeds.opml does). The parser resolves no entities and fetches nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lxml import etree

from worker.errors import Permanent


@dataclass(frozen=True)
class OpmlFeed:
    """One feed outline: its URL, title, site and the folders it sits in."""

    url: str
    title: str | None = None
    site_url: str | None = None
    category: str | None = None


def read_opml(data: bytes) -> list[OpmlFeed]:
    """Every outline with an xmlUrl, in document order; raise Permanent on a broken file."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise Permanent("bad_opml", str(exc)) from exc
    if root.tag != "opml":
        raise Permanent("bad_opml", f"root element is <{root.tag}>, not <opml>")
    feeds: list[OpmlFeed] = []
    seen: set[str] = set()
    for outline in root.iter("outline"):
        url = (outline.get("xmlUrl") or "").strip()
        if not url or url in seen:
            continue
        seen.add(url)
        folders = [(o.get("title") or o.get("text") or "").strip()
                   for o in outline.iterancestors("outline")]
        title = (outline.get("title") or outline.get("text") or "").strip()
        feeds.append(OpmlFeed(
            url=url,
            title=title if title and title != url else None,  # text is required: often the URL
            site_url=(outline.get("htmlUrl") or "").strip() or None,
            category="/".join(reversed([f for f in folders if f])) or None,
        ))
    return feeds


def write_opml(feeds: Iterable[OpmlFeed], *, title: str) -> bytes:
    """An OPML 2.0 document listing the feeds, grouped by category."""
    root = etree.Element("opml", version="2.0")
    head = etree.SubElement(root, "head")
    etree.SubElement(head, "title").text = title
    body = etree.SubElement(root, "body")
    folders: dict[str, etree._Element] = {}
    for feed in feeds:
        parent = body
        if feed.category:
            if feed.category not in folders:
                folders[feed.category] = etree.SubElement(body, "outline", text=feed.category)
            parent = folders[feed.category]
        attrs = {"type": "rss", "text": feed.title or feed.url, "xmlUrl": feed.url}
        if feed.title:
            attrs["title"] = feed.title
        if feed.site_url:
            attrs["htmlUrl"] = feed.site_url
        etree.SubElement(parent, "outline", attrs)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)
