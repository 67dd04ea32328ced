"""Page to article text and metadata, wrapping trafilatura at the edge."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

import trafilatura
from trafilatura.settings import use_config

from worker.errors import Permanent
from worker.types import Article, Page

# trafilatura's own per-document timeout uses signals and only works in the main thread; the
# task's soft time limit bounds extraction instead. min_extracted_size lowered so that short
# wire briefs (two or three paragraphs) are still kept.
_CONFIG = use_config()
_CONFIG.set("DEFAULT", "EXTRACTION_TIMEOUT", "0")
_CONFIG.set("DEFAULT", "MIN_EXTRACTED_SIZE", "200")

EXTRACTOR_VERSION = f"trafilatura-{trafilatura.__version__}"
# Every option talkwire extracts with, in one place: ops/bench pipeline times bare trafilatura
# with exactly these, so its ratio compares like with like (issue 9).
EXTRACTION_OPTIONS: dict[str, Any] = {
    "with_metadata": True,
    "include_comments": False,
    "include_tables": True,
    "config": _CONFIG,
}
# Below this the "article" is a menu or a cookie notice, not a story; the shortest wire
# briefs we keep are two sentences.
MIN_TEXT_CHARS = 80
# The page's declared language: <html lang>, or the Content-Language meta. Read from the head
# only, since a declared language beats guessing from a few paragraphs.
_LANG_RE = re.compile(
    rb"""<html[^>]*?\slang\s*=\s*["']?([A-Za-z]{2,3})|"""
    rb"""<meta[^>]+http-equiv\s*=\s*["']?content-language["']?[^>]+content\s*=\s*["']?([A-Za-z]{2,3})""",
    re.IGNORECASE,
)


def decode_page(page: Page) -> tuple[str | bytes, tuple[str, ...]]:
    """The page body as text when its declared charset decodes it cleanly, else raw bytes."""
    if page.charset:
        try:
            return page.body.decode(page.charset), ()
        except (LookupError, UnicodeDecodeError):
            # A wrong label (cp1252 sent as UTF-8 is common): let trafilatura sniff instead.
            return page.body, (f"charset_mismatch:{page.charset}",)
    return page.body, ()


def extract_article(page: Page) -> Article:
    """Extract the main text and metadata of an article page; Permanent('no_text') if none."""
    content, warnings = decode_page(page)
    doc = trafilatura.bare_extraction(content, url=page.final_url, **EXTRACTION_OPTIONS)
    if doc is None:
        raise Permanent("no_text", "trafilatura found no main text")
    data = doc.as_dict() if hasattr(doc, "as_dict") else dict(doc)
    text = _strip_nul(data.get("text") or "").strip()
    if len(text) < MIN_TEXT_CHARS:
        raise Permanent("no_text", f"main text has {len(text)} characters")
    return Article(
        url=page.final_url,
        title=_strip_nul(data.get("title")) or None,
        text=text,
        published=_parse_date(data.get("date")),
        author=_strip_nul(data.get("author")) or None,
        site_name=_strip_nul(data.get("sitename")) or None,
        language=data.get("language") or declared_language(page.body),
        canonical_url=data.get("url") if data.get("url") != page.final_url else None,
        description=_strip_nul(data.get("description")) or None,
        extractor=EXTRACTOR_VERSION,
        warnings=warnings,
    )


def _strip_nul(value: object) -> str:
    # Postgres text cannot hold NUL, and lone surrogates cannot be encoded as UTF-8.
    if not isinstance(value, str):
        return ""
    return value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def _parse_date(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def declared_language(body: bytes) -> str | None:
    """The two- or three-letter language the page declares in its head, lower-cased."""
    match = _LANG_RE.search(body[:8192])
    if not match:
        return None
    return (match.group(1) or match.group(2)).decode("ascii").lower()


def article_from_text(url: str, text: str, *, title: str | None) -> Article:
    """An article from plain text a producer sent (no page to extract); Permanent('no_text') if short."""
    clean = _strip_nul(text).strip()
    if len(clean) < MIN_TEXT_CHARS:
        raise Permanent("no_text", f"text has {len(clean)} characters")
    return Article(url=url, title=_strip_nul(title) or None, text=clean, extractor="producer-text")
