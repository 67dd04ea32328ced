"""ops/bench classify: classification speed beside trafilatura's extraction, same pages, same run.

Pages: ../shared/eval-data/article_extraction_benchmark (181 real pages) when present,
otherwise the repository's own fixture and demo pages.
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import time
from datetime import date
from pathlib import Path

from worker.classify import classify_article, load_knowledge
from worker.errors import Permanent
from worker.extract import extract_article
from worker.types import Page

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO.parent / "shared" / "eval-data" / "article_extraction_benchmark" / "html"


def load_pages() -> tuple[str, list[bytes]]:
    """The pages to measure on, and where they came from."""
    if BENCH.is_dir():
        return str(BENCH), [gzip.decompress(p.read_bytes()) for p in sorted(BENCH.glob("*.html.gz"))]
    own = sorted((REPO / "seeds" / "demo" / "pages").glob("*.html")) + sorted(
        (REPO / "tests" / "fixtures" / "site").rglob("*.html"))
    return "repository fixtures", [p.read_bytes() for p in own]


def main() -> None:
    """Time extraction and classification per page and print both and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3, help="passes over the pages (best is kept)")
    args = parser.parse_args()
    source, pages = load_pages()
    knowledge = load_knowledge()
    classify_article(text="warm up", title=None, language=None, published=None, knowledge=knowledge)
    extract_ms: list[float] = []
    classify_ms: list[float] = []
    for index, body in enumerate(pages):
        page = Page(url=f"http://bench.invalid/{index}", final_url=f"http://bench.invalid/{index}",
                    status=200, body=body)
        best_extract = best_classify = float("inf")
        for _ in range(args.repeat):
            started = time.perf_counter()
            try:
                article = extract_article(page)
            except Permanent:
                article = None
            best_extract = min(best_extract, time.perf_counter() - started)
            if article is None:
                continue
            started = time.perf_counter()
            classify_article(text=article.text, title=article.title, language=article.language,
                             published=(article.published.date() if article.published
                                        else date(2020, 1, 1)), knowledge=knowledge)
            best_classify = min(best_classify, time.perf_counter() - started)
        extract_ms.append(best_extract * 1000)
        if best_classify != float("inf"):
            classify_ms.append(best_classify * 1000)
    total_extract, total_classify = sum(extract_ms), sum(classify_ms)
    print(f"pages: {len(pages)} from {source} ({len(classify_ms)} with text), best of {args.repeat}")
    print(f"extract  (trafilatura): mean {statistics.mean(extract_ms):7.2f} ms/page, "
          f"p50 {statistics.median(extract_ms):6.2f} ms")
    print(f"classify (talkwire):    mean {statistics.mean(classify_ms):7.2f} ms/article, "
          f"p50 {statistics.median(classify_ms):6.2f} ms, "
          f"{1000 / statistics.mean(classify_ms):,.0f} articles/s on one core")
    print(f"classification / extraction time: {total_classify / total_extract:.1%} "
          "(target: under 10%)")


if __name__ == "__main__":
    main()
