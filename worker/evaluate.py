"""Measure the classifier on the shared evaluation corpus (../shared/eval-data).

The corpus is third-party text used for evaluation only; nothing here copies it anywhere.
Sources and how each is read:

- reuters_feed_2016_teftst/articles.jsonl: title + text, post_date; gold label per article
  (other_mentions_syria counts as other).
- wcep_current_events_nixworks/events.csv: one-sentence summaries, no title; gold label.
- rss_link_database_2021_2022/rss2024_tehrantimes_handpicked.jsonl: title + description; gold.
- feeds_fastfeedparser/*.xml: title + description of every item, parsed by feedparser from
  the file's bytes; unlabelled, used as negatives (none is about the talks).
- huffpost_news_category_subset and rss_link_database_2021_2022/entries_subset.jsonl:
  headline + lede; unrelated negatives, the base for false positives per 1,000.

`evaluate_classifier` returns None when the corpus folder is absent, so callers can print
"skipped" instead of failing.
"""

from __future__ import annotations

import csv
import html
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import feedparser

from worker.classify import (
    LABELS,
    RULES_VERSION,
    Knowledge,
    classify_article,
    load_knowledge,
)

# Sources whose items carry a four-way gold label (the confusion matrix uses only these).
LABELLED_SOURCES = ("teftst", "wcep", "tehrantimes")
# Unrelated negatives: the base of "false positives per 1,000 unrelated items".
UNRELATED_SOURCES = ("huffpost", "rss_database")
TITLE_WIDTH = 90

_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class EvalItem:
    """One corpus item as the classifier sees it, with its gold label (None: unlabelled)."""

    source: str
    id: str
    title: str | None
    text: str
    published: date | None
    gold: str | None


@dataclass(frozen=True)
class BinaryScores:
    """Counts of one yes/no decision and the usual ratios."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> float:
        """Share of predicted positives that are positive (1.0 when none is predicted)."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        """Share of positives that were found (1.0 when there are none)."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall."""
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


@dataclass(frozen=True)
class ErrorCase:
    """A disagreement with the gold label, with enough to find the item again."""

    kind: str  # "FP" or "FN" for talks; "confusion" for other four-way disagreements
    source: str
    id: str
    title: str
    gold: str
    predicted: str
    score: float


@dataclass(frozen=True)
class ClassifierReport:
    """Everything `format_classifier_report` prints."""

    corpus: str
    rules_version: str
    knowledge_fingerprint: str
    items_per_source: tuple[tuple[str, int], ...]
    talks_strict: BinaryScores  # gold talks vs everything else; related is negative
    talks_lenient: BinaryScores  # talks or related on both sides; related is positive
    confusion: tuple[tuple[int, ...], ...]  # rows gold, columns predicted, in LABELS order
    unrelated_items: int
    unrelated_talks: int  # predicted talks among the unrelated negatives
    unrelated_related: int  # predicted related among them (reported, not a target)
    errors: tuple[ErrorCase, ...]
    mean_ms: float  # CPU milliseconds per item
    p95_ms: float

    @property
    def fp_per_1000(self) -> float:
        """Talks predicted per 1,000 unrelated items."""
        return 1000.0 * self.unrelated_talks / self.unrelated_items if self.unrelated_items else 0.0


def evaluate_classifier(
    corpus: Path, knowledge: Knowledge | None = None
) -> ClassifierReport | None:
    """Classify every corpus item and score it; None when the corpus folder is absent."""
    corpus = Path(corpus)
    if not corpus.is_dir():
        return None
    knowledge = knowledge or load_knowledge()
    items = list(read_corpus(corpus))
    strict = [0, 0, 0, 0]
    lenient = [0, 0, 0, 0]
    confusion = [[0] * len(LABELS) for _ in LABELS]
    per_source: dict[str, int] = {}
    unrelated = unrelated_talks = unrelated_related = 0
    errors: list[ErrorCase] = []
    timings: list[float] = []
    for item in items:
        per_source[item.source] = per_source.get(item.source, 0) + 1
        # CPU time, not wall time: the figure should not depend on what else the host runs.
        started = time.process_time_ns()
        result = classify_article(
            text=item.text,
            title=item.title,
            language=None,
            published=item.published,
            knowledge=knowledge,
        )
        timings.append((time.process_time_ns() - started) / 1e6)
        predicted = result.label
        gold = item.gold or "other"  # unlabelled sources hold no talks story
        _count(strict, gold == "talks", predicted == "talks")
        _count(lenient, gold in ("talks", "related"), predicted in ("talks", "related"))
        if item.source in UNRELATED_SOURCES:
            unrelated += 1
            unrelated_talks += predicted == "talks"
            unrelated_related += predicted == "related"
        if item.gold is not None and item.source in LABELLED_SOURCES:
            confusion[LABELS.index(gold)][LABELS.index(predicted)] += 1
        kind = None
        if (gold == "talks") != (predicted == "talks"):
            kind = "FN" if gold == "talks" else "FP"
        elif item.gold is not None and gold != predicted:
            kind = "confusion"
        if kind:
            errors.append(
                ErrorCase(
                    kind,
                    item.source,
                    item.id,
                    _shorten(item.title or item.text),
                    gold,
                    predicted,
                    result.score,
                )
            )
    timings.sort()
    return ClassifierReport(
        corpus=str(corpus),
        rules_version=RULES_VERSION,
        knowledge_fingerprint=knowledge.fingerprint,
        items_per_source=tuple(sorted(per_source.items())),
        talks_strict=BinaryScores(*strict),
        talks_lenient=BinaryScores(*lenient),
        confusion=tuple(tuple(row) for row in confusion),
        unrelated_items=unrelated,
        unrelated_talks=unrelated_talks,
        unrelated_related=unrelated_related,
        errors=tuple(sorted(errors, key=lambda e: ("FP", "FN", "confusion").index(e.kind))),
        mean_ms=sum(timings) / len(timings) if timings else 0.0,
        p95_ms=timings[int(0.95 * (len(timings) - 1))] if timings else 0.0,
    )


def format_classifier_report(report: ClassifierReport) -> str:
    """The report as plain text for a terminal."""
    lines = [
        f"classifier evaluation: {report.corpus}",
        f"rules {report.rules_version}, knowledge {report.knowledge_fingerprint}",
        "items: " + ", ".join(f"{name} {n}" for name, n in report.items_per_source),
        "",
        "talks (related counted negative):   " + _binary_line(report.talks_strict),
        "talks (related counted positive):   " + _binary_line(report.talks_lenient),
        f"false positives on unrelated items: {report.unrelated_talks} talks in "
        f"{report.unrelated_items} = {report.fp_per_1000:.2f} per 1,000 "
        f"({report.unrelated_related} labelled related)",
        f"CPU time per item: mean {report.mean_ms:.2f} ms, p95 {report.p95_ms:.2f} ms",
        "",
        "confusion (rows gold, columns predicted; "
        + "/".join(LABELLED_SOURCES)
        + " only, other_mentions_syria as other):",
    ]
    width = max(len(label) for label in LABELS) + 2
    lines.append(" " * width + "".join(f"{label:>{width}}" for label in LABELS))
    for label, row in zip(LABELS, report.confusion, strict=True):
        lines.append(f"{label:<{width}}" + "".join(f"{n:>{width}}" for n in row))
    lines.append("")
    if report.errors:
        lines.append("errors (kind source id: gold -> predicted, score, title):")
        for e in report.errors:
            lines.append(
                f"  {e.kind:<9} {e.source} {e.id}: {e.gold} -> {e.predicted} "
                f"({e.score:.2f}) {e.title}"
            )
    else:
        lines.append("errors: none")
    return "\n".join(lines)


def _binary_line(s: BinaryScores) -> str:
    return (
        f"precision {s.precision:.3f}  recall {s.recall:.3f}  F1 {s.f1:.3f}  "
        f"(tp {s.tp}, fp {s.fp}, fn {s.fn}, tn {s.tn})"
    )


def _count(cells: list[int], gold: bool, predicted: bool) -> None:
    # cells: tp, fp, fn, tn
    cells[0 if gold and predicted else 1 if predicted else 2 if gold else 3] += 1


def _shorten(text: str) -> str:
    text = _SPACE.sub(" ", text).strip()
    return text if len(text) <= TITLE_WIDTH else text[: TITLE_WIDTH - 1] + "…"


def _plain(markup: str | None) -> str:
    """Feed descriptions carry HTML: drop tags and entities."""
    return _SPACE.sub(" ", html.unescape(_TAG.sub(" ", markup or ""))).strip()


def _day(value: str | None) -> date | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.strip().replace("Z", "+00:00")).date()
    except ValueError:
        try:
            return date.fromisoformat(value.strip()[:10])
        except ValueError:
            return None


def _gold(label: str | None) -> str | None:
    if not label:
        return None
    return "other" if label == "other_mentions_syria" else label


def read_corpus(corpus: Path) -> Iterator[EvalItem]:
    """Every evaluation item under `corpus`, source by source; missing files are skipped."""
    yield from _read_teftst(corpus / "reuters_feed_2016_teftst" / "articles.jsonl")
    yield from _read_wcep(corpus / "wcep_current_events_nixworks" / "events.csv")
    yield from _read_rss(
        corpus / "rss_link_database_2021_2022" / "rss2024_tehrantimes_handpicked.jsonl",
        "tehrantimes",
    )
    yield from _read_feeds(corpus / "feeds_fastfeedparser")
    yield from _read_huffpost(corpus / "huffpost_news_category_subset")
    yield from _read_rss(
        corpus / "rss_link_database_2021_2022" / "entries_subset.jsonl", "rss_database"
    )


def _jsonl(path: Path) -> Iterator[dict[str, object]]:
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _read_teftst(path: Path) -> Iterator[EvalItem]:
    for row in _jsonl(path):
        yield EvalItem(
            "teftst",
            str(row["id"]),
            str(row.get("title") or ""),
            str(row.get("text") or ""),
            _day(str(row.get("post_date") or "")),
            _gold(str(row.get("label") or "")),
        )


def _read_wcep(path: Path) -> Iterator[EvalItem]:
    if not path.is_file():
        return
    with path.open(encoding="utf-8", newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            yield EvalItem(
                "wcep",
                f"{row['date']}#{i}",
                None,
                row["summary"],
                _day(row["date"]),
                _gold(row.get("label")),
            )


def _read_rss(path: Path, source: str) -> Iterator[EvalItem]:
    for i, row in enumerate(_jsonl(path)):
        yield EvalItem(
            source,
            str(row.get("link") or i),
            _plain(str(row.get("title") or "")),
            _plain(str(row.get("description") or "")),
            _day(str(row.get("date_published") or "")),
            _gold(str(row.get("label") or "")) if "label" in row else None,
        )


def _read_huffpost(folder: Path) -> Iterator[EvalItem]:
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else ():
        for i, row in enumerate(_jsonl(path)):
            yield EvalItem(
                "huffpost",
                str(row.get("link") or i),
                str(row.get("headline") or ""),
                str(row.get("short_description") or ""),
                _day(str(row.get("date") or "")),
                None,
            )


def _read_feeds(folder: Path) -> Iterator[EvalItem]:
    for path in sorted(folder.glob("*.xml")) if folder.is_dir() else ():
        # Bytes, never a path: given a string, feedparser would open it itself.
        parsed = feedparser.parse(path.read_bytes())
        for i, entry in enumerate(parsed.entries):
            stamp = entry.get("published_parsed") or entry.get("updated_parsed")
            yield EvalItem(
                "feeds",
                f"{path.stem}#{i}",
                _plain(entry.get("title")),
                _plain(entry.get("summary") or entry.get("description")),
                date(stamp.tm_year, stamp.tm_mon, stamp.tm_mday) if stamp else None,
                None,
            )
