"""`talkwire eval dedup`: precision and recall of the dedup rules on the development pairs.

Reads `reuters_feed_2016_teftst/` from the shared evaluation data (never shipped with the
repository), runs each article through the real extraction and signature stages in
publication order, finds candidates by the same LSH band keys the database indexes, verifies
them with the same rule the pipeline applies, and groups matches into stories the way
`worker.lineage` merges them (every match joins, so a story is a connected component).
"""

from __future__ import annotations

import csv
import itertools
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from worker import dedup
from worker.errors import Permanent
from worker.extract import extract_article
from worker.lineage import MAX_CANDIDATES
from worker.types import Page

CORPUS_DIR = "reuters_feed_2016_teftst"
SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class Edge:
    """A verified candidate pair: the later article, the earlier one, and their overlap."""

    later: str
    earlier: str
    similarity: dedup.Similarity
    method: str | None  # what classify_match said: update | near | None (no match)


@dataclass
class DedupEval:
    """What the evaluation measured."""

    articles: int
    labelled: set[frozenset[str]]
    predicted: set[frozenset[str]]
    talks_ids: set[str]
    edges: list[Edge]
    skipped: list[str] = field(default_factory=list)
    # Every pair's exact overlap, LSH or not: shows how far the threshold is from each side.
    all_pairs: list[Edge] = field(default_factory=list)

    @property
    def true_positives(self) -> set[frozenset[str]]:
        """Labelled pairs that were filed into one story."""
        return self.labelled & self.predicted

    @property
    def precision(self) -> float:
        """Share of merged pairs that are labelled copies."""
        return len(self.true_positives) / len(self.predicted) if self.predicted else 1.0

    @property
    def recall(self) -> float:
        """Share of labelled copies that were merged."""
        return len(self.true_positives) / len(self.labelled) if self.labelled else 1.0

    @property
    def false_merges(self) -> set[frozenset[str]]:
        """Merged pairs that are not labelled copies (over all other article pairs)."""
        return self.predicted - self.labelled

    @property
    def talks_false_merges(self) -> set[frozenset[str]]:
        """False merges that involve an article labelled 'talks'."""
        return {p for p in self.false_merges if p & self.talks_ids}


def load_corpus(folder: Path) -> tuple[list[dict[str, object]], set[frozenset[str]]]:
    """The articles (in publication order) and the labelled duplicate pairs."""
    with (folder / "articles.jsonl").open(encoding="utf-8") as fh:
        articles = [json.loads(line) for line in fh if line.strip()]
    articles.sort(key=lambda a: (str(a["post_date"]), str(a["id"])))
    with (folder / "duplicate_pairs.csv").open(encoding="utf-8", newline="") as fh:
        pairs = {frozenset((r["id_a"], r["id_b"])) for r in csv.DictReader(fh)}
    return articles, pairs


def evaluate_dedup(corpus: Path) -> DedupEval | None:
    """Run the dedup rules over the corpus; None when the corpus is not there."""
    folder = corpus / CORPUS_DIR
    if not (folder / "articles.jsonl").is_file() or not (folder / "duplicate_pairs.csv").is_file():
        return None
    articles, labelled = load_corpus(folder)
    bands: dict[int, list[str]] = defaultdict(list)
    fingerprints: dict[str, list[str]] = defaultdict(list)
    texts: dict[str, tuple[str, str | None]] = {}
    edges: list[Edge] = []
    skipped: list[str] = []
    for record in articles:
        art_id = str(record["id"])
        # The corpus holds the post body; wrap it as a page so the real extractor runs on it.
        html = (f"<html><head><title>{record['title']}</title></head>"
                f"<body><article>{record['html']}</article></body></html>")
        url = str(record["article_url"])
        try:
            article = extract_article(Page(url=url, final_url=url, status=200,
                                           body=html.encode("utf-8"), charset="utf-8"))
        except Permanent:
            skipped.append(art_id)
            continue
        signature = dedup.sign_text(article.text, article.title)
        shared: dict[str, int] = defaultdict(int)
        for key in signature.band_keys:
            for other in bands[key]:
                shared[other] += 1
        exact = fingerprints[signature.fingerprint]
        # The same cut the SQL lookup makes: most shared bands first, then oldest.
        order = {a: i for i, a in enumerate(texts)}
        ranked = sorted(shared, key=lambda a: (-shared[a], order[a]))[:MAX_CANDIDATES]
        shingles = dedup.shingle_words(dedup.body_words(article.text, article.title))
        for other in dict.fromkeys([*exact, *ranked]):
            sim = dedup.compare_texts(shingles, *texts[other])
            method = "exact" if other in exact else dedup.classify_match(sim)
            edges.append(Edge(art_id, other, sim, method))
        for key in signature.band_keys:
            bands[key].append(art_id)
        fingerprints[signature.fingerprint].append(art_id)
        texts[art_id] = (article.text, article.title)
    predicted = cluster_pairs(e for e in edges if e.method is not None)
    talks = {str(a["id"]) for a in articles if a.get("label") == "talks"}
    return DedupEval(len(articles), labelled, predicted, talks, edges, skipped,
                     compare_all_pairs(texts))


def compare_all_pairs(texts: dict[str, tuple[str, str | None]]) -> list[Edge]:
    """Exact overlap of every pair (brute force: fine for a corpus of a few hundred)."""
    shingles = {k: dedup.shingle_words(dedup.body_words(*v)) for k, v in texts.items()}
    edges = []
    for earlier, later in itertools.combinations(texts, 2):
        a, b = shingles[later], shingles[earlier]
        common = len(a & b)
        union = len(a) + len(b) - common
        smaller = min(len(a), len(b))
        sim = dedup.Similarity(common / union if union else 0.0,
                               common / smaller if smaller else 0.0, len(a), len(b))
        edges.append(Edge(later, earlier, sim, dedup.classify_match(sim)))
    return edges


def cluster_pairs(edges: Iterable[Edge]) -> set[frozenset[str]]:
    """Every pair of articles that ends in one story when each matched edge joins two stories."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for edge in edges:
        parent[find(edge.later)] = find(edge.earlier)
    groups: dict[str, list[str]] = defaultdict(list)
    for node in parent:
        groups[find(node)].append(node)
    return {frozenset(p) for g in groups.values() for p in itertools.combinations(sorted(g), 2)}


def sweep_thresholds(result: DedupEval) -> list[tuple[float, float, float, int]]:
    """(threshold, precision, recall, false merges) if NEAR_THRESHOLD were each value.

    Runs over every pair, not only LSH candidates, so it measures the verification rule alone.
    """
    rows = []
    for threshold in SWEEP:
        kept = [e for e in result.all_pairs if e.similarity.containment == 1.0 or (
            min(e.similarity.new_size, e.similarity.old_size) >= dedup.MIN_NEAR_SHINGLES
            and e.similarity.containment >= threshold)]
        predicted = cluster_pairs(kept)
        tp = len(predicted & result.labelled)
        rows.append((threshold, tp / len(predicted) if predicted else 1.0,
                     tp / len(result.labelled) if result.labelled else 1.0,
                     len(predicted - result.labelled)))
    return rows


def format_report(result: DedupEval) -> str:
    """The evaluation as plain text lines: headline figures, each labelled pair, a sweep."""
    lines = [
        (f"dedup rules {dedup.RULES_VERSION}, signature {dedup.SIGNATURE_METHOD}, "
         f"near threshold {dedup.NEAR_THRESHOLD} (containment of {dedup.SHINGLE_WORDS}-word shingles)"),
        (f"articles: {result.articles} ({len(result.skipped)} without text), "
         f"labelled pairs: {len(result.labelled)}, merged pairs: {len(result.predicted)}"),
        (f"precision: {result.precision:.3f}  recall: {result.recall:.3f}  "
         f"false merges: {len(result.false_merges)} of "
         f"{result.articles * (result.articles - 1) // 2 - len(result.labelled)} other pairs  "
         f"false merges with a talks article: {len(result.talks_false_merges)}"),
        "",
        "labelled pairs (method, containment, jaccard):",
    ]
    by_pair = {frozenset((e.later, e.earlier)): e for e in result.edges}
    for pair in sorted(result.labelled, key=sorted):
        a, b = sorted(pair)
        edge = by_pair.get(pair)
        verdict = "merged" if pair in result.predicted else "MISSED"
        detail = (f"{edge.method or 'no match'}, {edge.similarity.containment:.3f}, "
                  f"{edge.similarity.jaccard:.3f}" if edge else "not a candidate")
        lines.append(f"  {verdict:6}  {detail:28}  {a[:55]}  ~  {b[:55]}")
    for pair in sorted(result.false_merges, key=sorted):
        lines.append(f"  FALSE MERGE  {' ~ '.join(sorted(pair))}")
    lsh_found = sum(1 for p in result.labelled if p in by_pair)
    lines += ["", (f"LSH candidates: {len(result.edges)} verified, {lsh_found} of "
                   f"{len(result.labelled)} labelled pairs among them"),
              "", "threshold sweep over all pairs, without LSH (precision, recall, false merges):"]
    for threshold, precision, recall, false in sweep_thresholds(result):
        mark = "  <- in use" if threshold == dedup.NEAR_THRESHOLD else ""
        lines.append(f"  {threshold:.1f}  {precision:.3f}  {recall:.3f}  {false}{mark}")
    near_misses = sorted((e for e in result.all_pairs
                          if frozenset((e.later, e.earlier)) not in result.labelled),
                         key=lambda e: -e.similarity.containment)[:3]
    weakest = min((e for e in result.all_pairs if frozenset((e.later, e.earlier)) in result.labelled),
                  key=lambda e: e.similarity.containment, default=None)
    if weakest is not None:
        lines += ["", (f"weakest labelled pair: containment {weakest.similarity.containment:.3f}, "
                       f"jaccard {weakest.similarity.jaccard:.3f}")]
    lines += ["closest unlabelled pairs (containment, jaccard):"]
    for e in near_misses:
        lines.append(f"  {e.similarity.containment:.3f}  {e.similarity.jaccard:.3f}  "
                     f"{e.later[:55]}  ~  {e.earlier[:55]}")
    return "\n".join(lines)
