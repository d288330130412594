"""A request that makes the model raise fails alone: its batch neighbours are answered.

The scenario is `benchmarks.chaos.poison`: three rounds of one poison request among 50
neighbours (first, in the middle, last), each round consumed as one batch.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import chaos
from tests.integration.conftest import make_settings

NEIGHBOURS = 50


def test_poison_request_fails_alone_in_its_batch(bootstrap: str, tmp_path: Path) -> None:
    settings = make_settings(bootstrap, None)
    result = chaos.poison(settings, tmp_path, requests=NEIGHBOURS)
    for round_ in result["rounds"]:
        print(f"poison at {round_['poison_at']}, neighbour batch sizes {round_['batch_sizes']}")
    # Checked per response in the scenario, each count of breaches must be 0: every request
    # answered under its id; the poison one an error (model_error, "poison input"); every
    # neighbour ok with 2x + 1 and its timings; the neighbours ran in batches (a failing
    # batch is split, not run one by one), each batch size s accounting for a whole number
    # of batches of s; the DLQ holds exactly the three poison requests, as model_error from
    # the infer stage, with their exact bytes.
    assert set(result["violations"]) == {
        "unanswered", "poison_not_failed", "neighbour_failed", "wrong_output", "no_timings",
        "neighbour_count", "not_batched", "partial_batches", "dlq_ids", "dlq_record",
    }  # fmt: skip
    assert all(v == 0 for v in result["violations"].values()), result["examples"]
    assert [r["poison_at"] for r in result["rounds"]] == [0, NEIGHBOURS // 2, NEIGHBOURS]
    assert result["sent"] == result["answered"] == 3 * (NEIGHBOURS + 1)
    assert result["lost"] == 0 and result["dlq"] == 3
    assert result["crashes_unexpected"] == 0, "the worker exited"
