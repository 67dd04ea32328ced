"""`talkwire eval dedup` on the shared development pairs (skipped where they are absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import SHARED
from worker.cli import main
from worker.eval_dedup import CORPUS_DIR, evaluate_dedup

EVAL_DATA = SHARED / "eval-data"
needs_corpus = pytest.mark.skipif(not (EVAL_DATA / CORPUS_DIR).is_dir(),
                                  reason="shared eval-data not present")


@needs_corpus
def test_dedup_meets_its_targets_on_the_development_pairs() -> None:
    result = evaluate_dedup(EVAL_DATA)
    assert result is not None and result.articles == 172 and not result.skipped
    assert result.recall >= 0.9
    assert not result.talks_false_merges
    assert len(result.false_merges) == 0


@needs_corpus
def test_eval_dedup_prints_precision_recall_and_false_merges() -> None:
    result = CliRunner().invoke(main, ["eval", "dedup", "--corpus", str(EVAL_DATA)])
    assert result.exit_code == 0, result.output
    assert "precision: 1.000  recall: 1.000  false merges: 0 of 14697 other pairs" in result.output


def test_eval_dedup_skips_cleanly_without_the_corpus(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["eval", "dedup", "--corpus", str(tmp_path)])
    assert result.exit_code == 0 and "skipped" in result.output
