from __future__ import annotations

import pytest

from benchmarks import cost


def test_cost_reports_each_step_per_request() -> None:
    result = cost.measure(batch=8, rounds=2, repeats=2)
    assert result["batch"] == 8
    steps = [result[k] for k in ("admit_us", "compute_us", "respond_us")]
    assert all(s > 0 for s in steps)
    assert abs(result["total_us"] - sum(steps)) < 0.05


def test_answers_compares_the_two_encodings_of_one_batch() -> None:
    result = cost.answers(batch=8, repeats=1)
    assert result["scenario"] == "cost-answers" and result["batch"] == 8
    assert result["responses_us"] > 0 and result["template_us"] > 0
    assert result["template_over_responses"] == pytest.approx(
        result["template_us"] / result["responses_us"], rel=0.01
    )
