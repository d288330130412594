"""A flood of garbage mixed with valid requests: the worker never dies, every valid request
is answered with the model's outputs, every bad record lands in the DLQ exactly once with
a reason and its original bytes, and bad records whose id can be read are answered.

The scenario is `benchmarks.chaos.garbage`; the garbage comes from a seeded generator
(`pipeline.garbage.GarbageMaker`), so a failure replays exactly.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import chaos
from tests.integration.conftest import make_settings

N_GARBAGE = 10_000
N_VALID = 1_000


def test_garbage_flood_is_dead_lettered_and_valid_requests_served(
    bootstrap: str, model_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(bootstrap, model_dir)
    result = chaos.garbage(
        settings,
        tmp_path,
        requests=N_GARBAGE,
        valid_per_garbage=N_VALID / N_GARBAGE,
        with_bombs=False,  # test_bombs.py runs them
    )
    print(f"garbage kinds {result['kinds']}; DLQ reasons {result['dlq_reasons']}")
    assert result["garbage"] == N_GARBAGE and result["valid"] == N_VALID
    # Each promise is checked per record in the scenario; each count of breaches must be 0:
    # produced and landed; every valid answer ok with the model's outputs; every garbage
    # record in the DLQ once, with an expected reason, its source, an error text, its exact
    # bytes and its id; every answerable one answered once, with the DLQ's reason; nothing
    # handled by the catch-all for surprises.
    assert set(result["violations"]) >= {
        "produce_failed", "not_landed", "valid_wrong", "dlq_missing_or_extra", "dlq_twice",
        "originals_mismatch", "wrong_reason", "wrong_source", "no_error_text", "wrong_original",
        "wrong_request_id", "answer_missing", "answer_twice", "answer_wrong_status",
        "answer_reason_mismatch", "answer_expired_mismatch", "unexpected_error_logged",
    }  # fmt: skip
    assert all(v == 0 for v in result["violations"].values()), result["examples"]
    assert result["answered"] == N_VALID and result["lost"] == 0
    assert result["dlq"] == N_GARBAGE and result["duplicates_seen"] == 0
    assert sum(result["dlq_reasons"].values()) == N_GARBAGE
    assert result["answered_bad"] == result["answerable_bad"] > 0
    assert result["crashes_unexpected"] == 0, "the worker exited"
