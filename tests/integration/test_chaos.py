"""``sluice chaos`` end to end: the command itself in a child process against the session's
broker, its last stdout line parsed as the JSON summary (short versions of the scenarios
that `benchmarks.chaos` runs for minutes by hand)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

COMMON = {"sent", "answered", "lost", "duplicates_seen", "dlq", "crashes", "max_rss_mb"}


def _chaos(bootstrap: str, model_dir: Path, *args: str, timeout_s: float = 240) -> dict[str, Any]:
    env = {
        **os.environ,
        "SLUICE_BOOTSTRAP": bootstrap,
        "SLUICE_MODEL_DIR": str(model_dir),
        "SLUICE_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "chaos", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the command stops its workers on the way out
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"chaos {args} timed out:\n{out[-3000:]}\n{err[-3000:]}") from None
    assert out.strip(), f"no output (exit {proc.returncode}):\n{err[-3000:]}"
    result = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(result))
    assert proc.returncode == 0, f"exit {proc.returncode}: {result}\n{err[-3000:]}"
    assert set(result) >= COMMON, COMMON - set(result)
    return result


def test_scale_out_kill_one_of_three(bootstrap: str, model_dir: Path) -> None:
    result = _chaos(bootstrap, model_dir, "--scenario", "scale-out", "--duration-s", "10")
    assert result["scenario"] == "scale-out"
    assert result["sent"] == result["answered"] == 5000
    assert result["lost"] == 0 and result["ids_mismatched"] == 0
    assert result["outcomes"] == {"ok": 5000}
    assert result["crashes"] == 1 and result["crashes_unexpected"] == 0
    # Three members with two partitions each, then two survivors holding all six.
    assert result["partitions"] == 6
    assert [len(p) for p in result["assignment_before"]] == [2, 2, 2]
    assert len(result["assignment_after"]) == 2 and result["survivors_cover_all"]
    assert len(result["moved_partitions"]) == 2
    assert result["answered_after_kill_on_moved"] > 0
    assert result["rebalance_s"] is not None and result["rebalance_s"] > 0
    assert set(result["throughput_rps"]) == {"1", "2", "3"}
    assert all(rps > 0 for rps in result["throughput_rps"].values())
    assert result["throughput_lost"] == 0


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
def test_rolling_update_sigterm_under_load_loses_nothing(
    delivery: str, bootstrap: str, model_dir: Path
) -> None:
    """A Deployment's rolling update, twice: the old worker gets SIGTERM once the new one
    has joined, drains, commits and exits by itself, well within its shutdown bound."""
    result = _chaos(bootstrap, model_dir, "--scenario", "rolling-update", "--requests", "3000",
                    "--delivery", delivery)  # fmt: skip
    assert result["sent"] == result["answered"] == 3000
    assert result["lost"] == 0 and result["ids_mismatched"] == 0
    assert result["outcomes"] == {"ok": 3000}
    assert result["crashes_unexpected"] == 0
    assert result["exit_codes"] == [0, 0]  # stopped by itself, not by the watchdog or SIGKILL
    assert len(result["shutdown_s"]) == 2
    assert max(result["shutdown_s"]) < 30  # Settings.shutdown_timeout_s
    if delivery == "exactly_once":
        assert result["duplicates_seen"] == 0


def test_short_soak(bootstrap: str, model_dir: Path) -> None:
    result = _chaos(bootstrap, model_dir, "--scenario", "soak", "--duration-s", "20")
    assert result["scenario"] == "soak"
    assert result["sent"] > 0 and result["answered"] == result["sent"]
    assert result["lost"] == 0 and result["duplicates_seen"] == 0
    assert result["outcomes"] == {"ok": result["sent"]}
    assert result["outputs_checked"] > 0 and result["wrong_outputs"] == 0
    assert result["undelivered"] == 0 and result["dlq"] == 0
    assert result["rate_rps"] > 0 and result["rate_rps"] <= result["capacity_rps"] / 2 + 1
    assert result["rss_samples"] >= 5
    assert 0 < result["rss_start_mb"] <= result["max_rss_mb"]
    assert 0 < result["rss_end_mb"] <= result["max_rss_mb"]
    assert isinstance(result["rss_slope_mb_per_min"], float)
    assert result["crashes"] == 0 and result["crashes_unexpected"] == 0
