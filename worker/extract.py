"""Page to article text and metadata, wrapping trafilatura at the edge."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

import lxml.etree
import lxml.html
import trafilatura
from lxml.html import HtmlElement
from trafilatura.settings import use_config

from worker.errors import Permanent
from worker.types import Article, Page

# trafilatura's own per-document timeout uses signals and only works in the main thread; the
# task's soft time limit bounds extraction instead. min_extracted_size lowered so that short
# wire briefs (two or three paragraphs) are still kept.
_CONFIG = use_config()
_CONFIG.set("DEFAULT", "EXTRACTION_TIMEOUT", "0")
_CONFIG.set("DEFAULT", "MIN_EXTRACTED_SIZE", "200")

# A page with more tags than this is checked for runs of siblings; a run is cut at
# MAX_SIBLINGS. A long real article has a few thousand elements.
MAX_ELEMENTS = 30_000
MAX_SIBLINGS = 2_000
# Any valid UTF-8 multi-byte sequence (RFC 3629 section 4); cp1252 text almost never has one.
_UTF8_MULTIBYTE = re.compile(
    rb"[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}"
    rb"|\xed[\x80-\x9f][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}"
    rb"|\xf4[\x80-\x8f][\x80-\xbf]{2}")

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
    """The page body as text, with warnings naming each encoding problem met (issue 8).

    Raw bytes are returned only when there is no usable label and no evidence, so that
    trafilatura sniffs; every repair is recorded in the warnings.
    """
    body, warnings = page.body, []
    utf16 = _utf16_without_bom(body)
    if utf16 is not None:
        text = body.decode(utf16, "replace")
        warnings.append(f"utf16_without_bom:{utf16}")
    elif page.charset:
        try:
            text = body.decode(page.charset)
        except (LookupError, UnicodeDecodeError):
            warnings.append(f"charset_mismatch:{page.charset}")
            if not _is_utf8_label(page.charset):
                return body, tuple(warnings)  # an exotic wrong label: let trafilatura sniff
            text = _decode_mislabelled_utf8(body, warnings)
    else:
        return body, ()
    if "\x00" in text:
        # Postgres text cannot hold NUL (and lxml stops at one): drop them, and say so.
        text = text.replace("\x00", "")
        warnings.append("nul_bytes")
    return text, tuple(warnings)


def _utf16_without_bom(body: bytes) -> str | None:
    """utf-16-le or utf-16-be when a BOM-less body is plainly UTF-16 markup, else None."""
    head = body[:2048]
    if len(head) < 16 or head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return None
    # Markup is ASCII: only the right byte order turns the head into readable tags. An
    # ASCII-compatible page read as UTF-16 gives CJK noise, never "<html".
    for codec in ("utf-16-le", "utf-16-be"):
        probe = head[: len(head) // 2 * 2].decode(codec, "ignore").lower()
        if any(tag in probe for tag in ("<html", "<!doctype", "<?xml", "<head", "<body")):
            return codec
    return None


def _is_utf8_label(charset: str) -> bool:
    return charset.lower().replace("_", "-") in ("utf-8", "utf8")


def _decode_mislabelled_utf8(body: bytes, warnings: list[str]) -> str:
    """Decode a body sent as UTF-8 that is not valid UTF-8: cp1252 or UTF-8 with bad bytes."""
    if _UTF8_MULTIBYTE.search(body) is None:
        # Not one valid multi-byte sequence: a legacy 8-bit page. windows-1252 is the WHATWG
        # Encoding Standard's default for such pages in Western locales.
        warnings.append("decoded_as:windows-1252")
        return body.decode("cp1252", "replace")
    # Real UTF-8 with some invalid bytes (or encoded lone surrogates): keep the rest intact.
    warnings.append("invalid_bytes")
    return body.decode("utf-8", "replace")


def cap_html(content: str | bytes) -> tuple[str | bytes | HtmlElement, tuple[str, ...]]:
    """Bound the tree trafilatura walks: siblings past MAX_SIBLINGS are cut (issue 8).

    trafilatura's link-density and table passes grow faster than linearly with the number of
    siblings (100k links or 60k table rows take about a minute), and it has no in-process
    timeout, so a huge flat page is trimmed before extraction and the cut is recorded.
    """
    marks = content.count("<" if isinstance(content, str) else b"<")
    if marks <= MAX_ELEMENTS:
        return content, ()
    try:
        tree = lxml.html.document_fromstring(content)
    except ValueError:  # a str with an XML encoding declaration
        tree = lxml.html.document_fromstring(
            content.encode("utf-8") if isinstance(content, str) else content)
    except lxml.etree.ParserError:
        return content, ()
    removed = 0
    for element in tree.iter():
        if len(element) > MAX_SIBLINGS:
            for child in list(element)[MAX_SIBLINGS:]:
                element.remove(child)
                removed += 1
    return tree, (f"html_capped:{removed}",) if removed else ()


def extract_article(page: Page) -> Article:
    """Extract the main text and metadata of an article page; Permanent('no_text') if none."""
    content, warnings = decode_page(page)
    content, capped = cap_html(content)
    warnings += capped
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
