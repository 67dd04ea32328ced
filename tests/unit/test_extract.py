"""trafilatura wrapped: fixture pages in, typed articles out."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from worker.errors import Permanent
from worker.extract import extract_article
from worker.types import Page

PAGES = Path(__file__).resolve().parents[1] / "fixtures" / "site" / "pages"


def page(name: str, charset: str | None = "utf-8", body: bytes | None = None) -> Page:
    url = f"http://news.example/pages/{name}"
    return Page(url=url, final_url=url, status=200,
                body=body if body is not None else (PAGES / name).read_bytes(), charset=charset)


def test_article_text_and_metadata() -> None:
    article = extract_article(page("astana4-arrival.html"))
    assert article.title == "Opposition team lands in Astana ahead of fourth round"
    assert article.author == "Lena Hartmann"
    assert article.published == datetime(2017, 5, 2, tzinfo=timezone.utc)
    assert article.language == "en"
    assert "Mohammad Alloush" in article.text
    # Navigation and footer boilerplate are not part of the text.
    assert "Subscribe" not in article.text and "All rights reserved" not in article.text


def test_french_page() -> None:
    article = extract_article(page("geneve6-cloture.html"))
    assert article.language == "fr"
    assert "sixième cycle" in article.text


def test_wrong_charset_label_falls_back_to_sniffing() -> None:
    body = (PAGES / "geneve6-cloture.html").read_text(encoding="utf-8").encode("cp1252")
    article = extract_article(page("geneve6-cloture.html", charset="utf-8", body=body))
    assert "sixième cycle" in article.text
    assert article.warnings == ("charset_mismatch:utf-8", "decoded_as:windows-1252")


def test_page_without_text_is_a_permanent_failure() -> None:
    with pytest.raises(Permanent) as info:
        extract_article(page("empty.html", body=b"<html><body><nav>Home</nav></body></html>"))
    assert info.value.reason == "no_text"
