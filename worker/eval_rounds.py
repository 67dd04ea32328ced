"""Evaluate the round linker: accuracy of the `about` round on labelled talks articles.

Reads ../shared/eval-data (third-party texts used for evaluation only; nothing here is
copied into the repository) and links each labelled article against the shipped calendar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from worker.classify import classify_article, compose_document, load_knowledge
from worker.rounds import SEED_ROUNDS, Round, link_rounds, load_seed_rounds


@dataclass(frozen=True)
class RoundCase:
    """One labelled article and what the linker said it is about."""

    article_id: str
    title: str
    expected: str
    got: tuple[str, ...]

    @property
    def correct(self) -> bool:
        """True when the expected round is the one (or among those) it is linked `about`."""
        return self.expected in self.got


@dataclass(frozen=True)
class RoundsReport:
    """Accuracy of the `about` link over every labelled item with a round id."""

    cases: tuple[RoundCase, ...]

    @property
    def accuracy(self) -> float:
        """Share of cases whose expected round is linked `about`."""
        return sum(c.correct for c in self.cases) / len(self.cases) if self.cases else 0.0


def evaluate_rounds(corpus: Path, registry: list[Round] | None = None) -> RoundsReport | None:
    """Link every labelled talks article of the corpus; None when the corpus is absent."""
    source = corpus / "reuters_feed_2016_teftst" / "articles.jsonl"
    if not source.exists():
        return None
    rounds = registry if registry is not None else load_seed_rounds(SEED_ROUNDS)
    knowledge = load_knowledge()
    cases = []
    for line in source.read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        if not item.get("round_id"):
            continue
        published = date.fromisoformat(item["post_date"][:10])
        result = classify_article(text=item["text"], title=item["title"], language="en",
                                  published=published, knowledge=knowledge)
        linking = link_rounds(result, document=compose_document(item["title"], item["text"]),
                              published=published, registry=rounds)
        about = tuple(link.round_id for link in linking.links if link.relation == "about")
        cases.append(RoundCase(item["id"], item["title"], item["round_id"], about))
    return RoundsReport(tuple(cases))


def format_rounds_report(report: RoundsReport) -> str:
    """A plain-text report: accuracy, then each miss with what was linked instead."""
    lines = [f"about-round accuracy: {report.accuracy:.3f} "
             f"({sum(c.correct for c in report.cases)}/{len(report.cases)} labelled talks items)"]
    for case in report.cases:
        if not case.correct:
            lines.append(f"  miss: expected {case.expected}, got {', '.join(case.got) or 'none'}"
                         f" | {case.title[:70]}")
    return "\n".join(lines)
