"""The classifier: golden fixture cases, the seed story, invariants, and the evaluation run."""

from __future__ import annotations

import json
import tomllib
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from worker.classify import (
    LABELS,
    RELATIONS,
    RULES_VERSION,
    ActorInfo,
    Classification,
    Knowledge,
    Phrases,
    classify_article,
    compose_document,
    load_knowledge,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
CASES_DIR = FIXTURES / "classify"
SHARED = REPO.parent / "shared"
SEED = SHARED / "seeds" / "000_bd77398d2cc811f7.txt"
OWN_WORDS = FIXTURES / "seed_story_own_words.txt"
EVAL_DATA = SHARED / "eval-data"


@pytest.fixture(scope="module")
def knowledge() -> Knowledge:
    return load_knowledge()


def load_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    for path in sorted(CASES_DIR.glob("*.toml")):
        with path.open("rb") as fh:
            for case in tomllib.load(fh)["case"]:
                cases.append(case | {"file": path.name})
    return cases


CASES = load_cases()


def run(case: dict[str, Any], knowledge: Knowledge) -> Classification:
    return classify_article(
        text=case["text"],
        title=case.get("title"),
        language=case.get("language"),
        published=case.get("published"),
        knowledge=knowledge,
    )


def assert_spans(result: Classification, document: str) -> None:
    """Every evidence span indexes the composed document and quotes it exactly."""
    evidences = (
        [h.evidence for h in result.track_hits]
        + [r.evidence for r in result.rounds]
        + [d.evidence for d in result.dates]
        + [v.evidence for v in result.venues]
        + [a.evidence for a in result.actors]
        + list(result.evidence)
    )
    for ev in evidences:
        assert 0 <= ev.start <= ev.end <= len(document)
        assert document[ev.start : ev.end] == ev.text


def round_matches(mention: Any, want: dict[str, Any]) -> bool:
    if "number" in want and mention.number != want["number"]:
        return False
    if "relation" in want and mention.relation != want["relation"]:
        return False
    if "track" in want and mention.track != want["track"]:
        return False
    if "venue" in want and mention.venue != want["venue"]:
        return False
    return "dates" not in want or mention.date_range == tuple(want["dates"])


def describe(result: Classification) -> str:
    rounds = [(r.track, r.number, r.relation, r.date_range, r.evidence.text) for r in result.rounds]
    return f"label={result.label} tracks={result.tracks} rounds={rounds} signals={result.signals}"


# --- golden cases -----------------------------------------------------------------------------


def test_fixtures_cover_every_kind_in_five_languages() -> None:
    kinds: dict[str, set[str]] = {}
    for case in CASES:
        if case["label"] == "talks":
            kinds.setdefault(case["kind"], set()).add(case["language"])
    for kind in (
        "ordinal word",
        "numeral",
        "roman numeral",
        "relative previous",
        "next round this month",
        "next week's talks",
        "date range only",
    ):
        assert len(kinds.get(kind, set())) >= 5, (kind, kinds.get(kind))
    negatives = {case["kind"] for case in CASES if case["label"] != "talks"}
    assert {
        "other talks in Geneva",
        "other talks in Vienna",
        "other talks in Doha",
        "other talks in Istanbul",
        "other talks in Sochi",
        "Kazakhstan news mentioning Astana",
        "Syria war news, ceasefire in passing",
        "passing mention of Syria",
    } <= negatives


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_golden_case(case: dict[str, Any], knowledge: Knowledge) -> None:
    result = run(case, knowledge)
    assert result.label == case["label"], describe(result)
    assert_spans(result, compose_document(case.get("title"), case["text"]))
    want_tracks = case.get("tracks", [])
    if want_tracks:
        assert result.tracks and result.tracks[0] == want_tracks[0], describe(result)
        assert set(want_tracks) <= set(result.tracks), describe(result)
    for want in case.get("rounds", []):
        assert any(round_matches(r, want) for r in result.rounds), (want, describe(result))
    for unwanted in case.get("absent_rounds", []):
        assert not any(round_matches(r, unwanted) for r in result.rounds), describe(result)
    found_actors = {f"{a.name}/{a.role}" for a in result.actors}
    for want_actor in case.get("actors", []):
        assert want_actor in found_actors, (want_actor, sorted(found_actors))


# --- the seed story ---------------------------------------------------------------------------


def check_seed_facts(result: Classification, text: str) -> None:
    """The facts the seed story states, as the issue lists them."""
    assert result.label == "talks", describe(result)
    assert result.tracks[0] == "astana"
    current = [r for r in result.rounds if r.relation == "current" and r.number == 4]
    assert current, describe(result)
    assert any(
        r.track == "astana"
        and r.date_range == (date(2017, 5, 3), date(2017, 5, 4))
        and r.venue == "Astana"
        for r in current
    ), describe(result)
    earlier = [r for r in result.rounds if r.relation == "earlier" and r.track == "astana"]
    assert earlier, describe(result)
    assert any(r.date_range and r.date_range[0] == date(2017, 3, 1) for r in earlier), describe(
        result
    )
    assert any(r.number == 3 for r in earlier), describe(result)
    assert any(
        r.relation == "upcoming"
        and r.track == "geneva"
        and r.date_range == (date(2017, 5, 1), date(2017, 5, 31))
        for r in result.rounds
    ), describe(result)
    assert "Astana" in {v.name for v in result.venues}
    actors = {(a.name, a.role) for a in result.actors}
    for name, role in (
        ("Jaish al-Islam", "armed_group"),
        ("Mohammad Alloush", "delegation_head"),
        ("High Negotiations Committee", "opposition_body"),
        ("Bashar al-Jaafari", "delegation_head"),
        ("Staffan de Mistura", "mediator"),
        ("Russia", "guarantor"),
        ("Iran", "guarantor"),
        ("Turkey", "guarantor"),
    ):
        assert (name, role) in actors, (name, role, sorted(actors))
    if "observ" in text:  # the US sent an observer delegation
        assert ("United States", "observer") in actors, sorted(actors)


@pytest.mark.skipif(not SEED.is_file(), reason="shared seed story absent")
def test_seed_story(knowledge: Knowledge) -> None:
    text = SEED.read_text(encoding="utf-8")
    result = classify_article(
        text=text, title=None, language="en", published=date(2017, 5, 2), knowledge=knowledge
    )
    check_seed_facts(result, text)
    assert_spans(result, text)
    json.dumps(result.to_dict())  # storable as JSON


@pytest.mark.skipif(not OWN_WORDS.is_file(), reason="own-words seed fixture absent")
def test_seed_story_in_own_words(knowledge: Knowledge) -> None:
    raw = OWN_WORDS.read_text(encoding="utf-8").strip()
    title, _, body = raw.partition("\n\n")
    meta_path = OWN_WORDS.with_suffix(".json")
    published = date(2017, 5, 2)
    if meta_path.is_file():
        published = date.fromisoformat(json.loads(meta_path.read_text())["published"])
    result = classify_article(
        text=body, title=title, language="en", published=published, knowledge=knowledge
    )
    check_seed_facts(result, raw)
    assert_spans(result, compose_document(title, body))


# --- invariants and the public API ------------------------------------------------------------


def test_public_constants() -> None:
    assert RULES_VERSION.startswith("classify-")
    assert LABELS == ("talks", "related", "syria_other", "other")
    assert set(RELATIONS) == {"current", "earlier", "upcoming"}


def test_load_knowledge_default_path_and_cache(knowledge: Knowledge) -> None:
    again = load_knowledge()
    assert again.fingerprint == knowledge.fingerprint
    assert {t.id for t in knowledge.tracks} >= {
        "astana",
        "geneva",
        "sochi",
        "constitutional",
        "issg",
    }
    assert {lang.code for lang in knowledge.languages} >= {"en", "fr", "ar", "ru", "tr", "de"}


def test_new_envoy_is_data_not_code(knowledge: Knowledge) -> None:
    text = "Envoy Ilse Vantongeren met Syrian government negotiators at the Geneva talks on Syria."
    before = classify_article(
        text=text, title=None, language=None, published=None, knowledge=knowledge
    )
    assert "Ilse Vantongeren" not in {a.name for a in before.actors}
    envoy = ActorInfo(
        name="Ilse Vantongeren",
        role="mediator",
        side="un",
        weight=2.0,
        syria=True,
        aliases=Phrases(("Ilse Vantongeren", "Vantongeren")),
    )
    extended = replace(
        knowledge, actors=(*knowledge.actors, envoy), fingerprint=knowledge.fingerprint + "+test"
    )
    after = classify_article(
        text=text, title=None, language=None, published=None, knowledge=extended
    )
    assert ("Ilse Vantongeren", "mediator") in {(a.name, a.role) for a in after.actors}


def test_title_spans_come_first(knowledge: Knowledge) -> None:
    title = "Syria peace talks resume in Geneva"
    text = "UN envoy Staffan de Mistura reopened the intra-Syrian talks on Monday."
    result = classify_article(
        text=text, title=title, language="en", published=date(2016, 3, 14), knowledge=knowledge
    )
    document = compose_document(title, text)
    assert document == title + "\n\n" + text
    assert result.label == "talks"
    assert any(e.start < len(title) for e in result.evidence)
    assert_spans(result, document)


def test_without_publication_date_relative_dates_are_not_resolved(knowledge: Knowledge) -> None:
    result = classify_article(
        text="The next round of Syria peace talks in Geneva opens next week, the UN said.",
        title=None,
        language=None,
        published=None,
        knowledge=knowledge,
    )
    assert result.label == "talks"
    assert result.dates == ()
    assert any(r.relation == "upcoming" for r in result.rounds)


def test_empty_and_odd_input(knowledge: Knowledge) -> None:
    for text, title in (("", None), ("", ""), ("   ", "x"), ("١٢٣ ---", None)):
        result = classify_article(
            text=text, title=title, language=None, published=None, knowledge=knowledge
        )
        assert result.label == "other"
        assert result.score == 0.0


def test_to_dict_is_json(knowledge: Knowledge) -> None:
    case = next(c for c in CASES if c["id"] == "en-ordinal")
    data = run(case, knowledge).to_dict()
    assert json.loads(json.dumps(data))["rules_version"] == RULES_VERSION
    assert data["rounds"][0]["date_range"] == ["2017-05-03", "2017-05-04"]


# --- evaluation -------------------------------------------------------------------------------


@pytest.mark.skipif(not EVAL_DATA.is_dir(), reason="shared eval-data absent")
def test_evaluation_meets_targets(knowledge: Knowledge) -> None:
    from worker.evaluate import evaluate_classifier, format_classifier_report

    report = evaluate_classifier(EVAL_DATA, knowledge)
    assert report is not None
    text = format_classifier_report(report)
    assert "related counted negative" in text and "confusion" in text
    assert report.talks_strict.precision >= 0.95, text
    assert report.talks_strict.recall >= 0.90, text
    assert report.fp_per_1000 <= 1.0, text


def test_evaluation_skips_without_corpus(tmp_path: Path) -> None:
    from worker.evaluate import evaluate_classifier

    assert evaluate_classifier(tmp_path / "absent") is None
