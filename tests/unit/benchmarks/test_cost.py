from __future__ import annotations

import gc
import shutil
from pathlib import Path

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


def test_a_step_runs_again_on_its_own_and_settles_its_batch() -> None:
    with cost.fused_path(batch=4, payload="json") as path:
        for name in cost.STEPS:
            getattr(path, name)()
        for _ in range(3):  # publish alone, as the counted run does
            path.publish()
        assert not path.tracker.pending
        assert len(path.publications) == 4


@pytest.mark.skipif(
    shutil.which("valgrind") is None or shutil.which("cc") is None,
    reason="needs valgrind and a C compiler",
)
def test_instructions_counts_each_step_under_callgrind() -> None:
    result = cost.instructions(batch=4, rounds=2)
    steps = [result[f"{k}_ir"] for k in cost.STEPS]
    # A request costs thousands of instructions in every step, and the counts add up.
    assert all(1_000 < s < 10_000_000 for s in steps), result
    assert abs(result["total_ir"] - sum(steps)) <= len(steps)


def test_callgrind_total_is_the_dump_totals_line(tmp_path: Path) -> None:
    dump = tmp_path / "out.1.1"
    dump.write_text("events: Ir\nsummary: 0\nfn=(1) f\n0 12\ntotals: 4242\n")
    assert cost._callgrind_total(dump) == 4242
    (tmp_path / "empty").write_text("events: Ir\nsummary: 0\n")
    with pytest.raises(RuntimeError):
        cost._callgrind_total(tmp_path / "empty")
