"""Dedup rules as pure functions: URL forms, signatures, match classes and version diffs."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from worker import dedup
from worker.extract import extract_article
from worker.types import Page

PAGES = Path(__file__).resolve().parents[1] / "fixtures" / "site" / "pages" / "dedup"


def google_article_id(url: str) -> str:
    """A news.google.com/rss/articles id of the pre-2024 kind: protobuf field 4 holds the URL."""
    raw = b"\x08\x13\x22" + bytes([len(url)]) + url.encode() + b"\xd2\x01\x00"
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def fixture_text(name: str) -> tuple[str, str | None]:
    url = f"http://news.example/pages/dedup/{name}"
    body = (PAGES / name).read_bytes().replace(b"{base}", b"http://news.example")
    article = extract_article(Page(url=url, final_url=url, status=200, body=body, charset="utf-8"))
    return article.text, article.title


TARGET = "https://www.levant-wire.example/2017/09/15/idlib-monitors.html"


@pytest.mark.parametrize("variant", [
    TARGET,
    TARGET + "?utm_source=rss&utm_medium=feed&utm_campaign=syria",
    TARGET + "?fbclid=IwAR0abc#comments",
    "HTTPS://WWW.LEVANT-WIRE.EXAMPLE:443/2017/09/15/idlib-monitors.html",
    # Google News redirect of the kind the 2016 Reuters feed carried (target in a parameter).
    "https://news.google.com/news/url?sa=t&fd=R&ct2=us&usg=AFQjCNF&clid=c3a7d30b&url=" + TARGET,
    # Google News RSS article link whose id still holds the URL (readable offline).
    f"https://news.google.com/rss/articles/{google_article_id(TARGET)}?oc=5",
    f"https://news.google.com/articles/{google_article_id(TARGET + '?utm_source=gn')}",
])
def test_url_variants_share_one_canonical_form(variant: str) -> None:
    assert dedup.canonicalize_url(variant) == TARGET


def test_links_that_cannot_be_read_offline_stay_as_they_are() -> None:
    # A post-2024 Google News id holds only an opaque token; FeedBurner paths hold no target.
    opaque = "https://news.google.com/rss/articles/CBMiWkFVX3lxTE9hYmNkZWZnaGlqa2xtbm9w?oc=5"
    assert dedup.unwrap_redirect_url(opaque) == opaque
    proxy = "http://feeds.reuters.com/~r/reuters/topNews/~3/6l8gQtUidKc/story01.htm"
    assert dedup.canonicalize_url(proxy) == proxy
    # Not a redirect at all, though on a Google host.
    assert dedup.unwrap_redirect_url("https://news.google.com/topics/abc") == \
        "https://news.google.com/topics/abc"


@pytest.mark.parametrize(("final", "declared", "expected"), [
    # No declaration: the fetched URL, cleaned.
    ("https://site.example/a.html?utm_source=x", None, ("https://site.example/a.html", "fetched")),
    # A declaration on the same site wins: AMP and mobile variants fold into the article.
    ("https://amp.site.example/a.amp.html", "https://www.site.example/a.html",
     ("https://www.site.example/a.html", "declared")),
    ("https://site.example/a.html?page=print", "https://site.example/a.html#top",
     ("https://site.example/a.html", "declared")),
    # Another outlet's URL is a syndication claim, not this outlet's article.
    ("https://courier.example/world/idlib.html", "https://wire.example/2017/idlib.html",
     ("https://courier.example/world/idlib.html", "fetched")),
    # A site root is a template bug (or a bare <base href>), never an article.
    ("https://site.example/2017/idlib.html", "https://site.example/",
     ("https://site.example/2017/idlib.html", "fetched")),
])
def test_choose_canonical_url(final: str, declared: str | None, expected: tuple[str, str]) -> None:
    assert dedup.choose_canonical_url(final, declared) == expected


def test_words_fold_case_width_and_marks_in_every_script() -> None:
    assert dedup.tokenize_words("GENÈVE — Genève, Geneve!") == ["geneve", "geneve", "geneve"]
    # Arabic harakat are optional: with or without them it is the same word.
    assert dedup.tokenize_words("مُحَادَثَات أستانا") == dedup.tokenize_words("محادثات أستانا")
    assert dedup.tokenize_words("Переговоры в Астане") == ["переговоры", "в", "астане"]


def test_signature_ignores_headline_and_punctuation() -> None:
    body = "Russia, Iran and Turkey agreed on Friday to deploy monitors around Idlib."
    one = dedup.sign_text("Guarantors agree on Idlib monitors\n" + body,
                          "Guarantors agree on Idlib monitors")
    two = dedup.sign_text("Idlib deal done\n" + body.replace(",", ""), "Idlib deal done")
    assert one.fingerprint == two.fingerprint and one.band_keys == two.band_keys
    assert len(one.band_keys) == dedup.BANDS == 32


def similarity(a: str, b: str) -> dedup.Similarity:
    text_a, title_a = fixture_text(a)
    text_b, title_b = fixture_text(b)
    return dedup.compare_texts(dedup.shingle_words(dedup.body_words(text_a, title_a)),
                               text_b, title_b)


def test_republished_copies_are_near_duplicates() -> None:
    # The Post rewrote the lead and dropped a paragraph; the Courier trimmed the end.
    assert dedup.classify_match(similarity("astana6-idlib-post.html", "astana6-idlib-wire.html")) == "near"
    assert dedup.classify_match(similarity("astana6-idlib-courier.html", "astana6-idlib-wire.html")) == "near"


def test_a_write_through_that_adds_paragraphs_is_an_update() -> None:
    sim = similarity("geneve8-ouverture-maj2.html", "geneve8-ouverture.html")
    assert sim.containment > 0.9 and sim.new_size > 1.5 * sim.old_size
    assert dedup.classify_match(sim) == "update"


def test_another_story_from_the_same_round_is_no_match() -> None:
    # It repeats two background paragraphs of the wire story word for word.
    sim = similarity("astana6-detainees.html", "astana6-idlib-wire.html")
    assert 0.1 < sim.containment < dedup.NEAR_THRESHOLD
    assert dedup.classify_match(sim) is None


def test_short_texts_never_match_by_overlap() -> None:
    sim = dedup.Similarity(jaccard=1.0, containment=1.0, new_size=8, old_size=8)
    assert dedup.classify_match(sim) is None


def test_version_diff_counts_paragraphs_and_flags_material_change() -> None:
    v1, _ = fixture_text("genf8-live-v1.html")
    v2, _ = fixture_text("genf8-live-v2.html")
    diff = dedup.diff_versions(v1, v2)
    assert (diff.paragraphs_added, diff.paragraphs_removed) == (1, 0)
    assert diff.paragraphs_changed == 2  # the headline and the second paragraph
    assert diff.material
    assert diff.summary().startswith("+1 paragraph, 2 changed (")
    typo = dedup.diff_versions(v1, v1.replace("Sicherheitsrats", "Sicherheitsrates"))
    assert typo.paragraphs_changed == 1 and not typo.material
