"""The round linker against the labelled development share (skips when it is absent)."""

from __future__ import annotations

import pytest

from tests.conftest import SHARED
from worker.eval_rounds import evaluate_rounds, format_rounds_report


def test_about_round_accuracy_on_the_development_share() -> None:
    report = evaluate_rounds(SHARED / "eval-data")
    if report is None:
        pytest.skip("../shared/eval-data is absent")
    assert len(report.cases) == 14
    assert report.accuracy >= 0.90, format_rounds_report(report)
