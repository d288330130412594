from __future__ import annotations

from benchmarks import cost


def test_cost_reports_each_step_per_request() -> None:
    result = cost.measure(batch=8, rounds=2, repeats=2)
    assert result["batch"] == 8
    steps = [result[k] for k in ("admit_us", "compute_us", "respond_us")]
    assert all(s > 0 for s in steps)
    assert abs(result["total_us"] - sum(steps)) < 0.05
