from __future__ import annotations

import gc

import pytest

from benchmarks import cost
from pipeline.engines.worker import GC_THRESHOLDS


def test_cost_reports_each_step_per_request() -> None:
    thresholds = gc.get_threshold()
    result = cost.measure(batch=8, rounds=2, repeats=2)
    assert gc.get_threshold() == thresholds and gc.get_freeze_count() == 0
    assert result["batch"] == 8
    steps = [result[f"{k}_us"] for k in ("consume", "admit", "compute", "respond", "publish")]
    assert all(s > 0 for s in steps)
    assert abs(result["total_us"] - sum(steps)) < 0.05


def test_the_collector_runs_as_in_a_worker_and_is_given_back() -> None:
    original = gc.get_threshold()
    gc.set_threshold(701, 11, 12)
    try:
        with cost.worker_gc():
            assert gc.get_threshold() == GC_THRESHOLDS
            assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (701, 11, 12) and gc.get_freeze_count() == 0
    finally:
        gc.set_threshold(*original)


def test_answers_compares_the_two_encodings_of_one_batch() -> None:
    result = cost.answers(batch=8, repeats=1)
    assert result["scenario"] == "cost-answers" and result["batch"] == 8
    assert result["responses_us"] > 0 and result["template_us"] > 0
    assert result["template_over_responses"] == pytest.approx(
        result["template_us"] / result["responses_us"], rel=0.01
    )
