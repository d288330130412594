"""`sluice bench --scenario prefetch` at small scale: every figure present, from one run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

FIELDS = (
    "hit_rate_patterned",
    "hit_rate_shuffled",
    "p99_ms_prefetch",
    "p99_ms_no_prefetch",
    "l3_lookups_per_absent_request",
    "result_cache_hit_ms",
    "model_call_ms",
)


def test_bench_prefetch_prints_its_figures(bootstrap: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "SLUICE_BOOTSTRAP": bootstrap,
        "SLUICE_CACHE_DIR": str(tmp_path / "cache"),
    }
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "bench", "--scenario", "prefetch",
         "--requests", "400", "--rate", "400", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for field in FIELDS:
        assert isinstance(result[field], float) and result[field] >= 0, (field, result)
    assert 0 <= result["hit_rate_patterned"] <= 1 and 0 <= result["hit_rate_shuffled"] <= 1
    phases = result["phases"]
    assert set(phases) == {
        "patterned", "no_prefetch", "shuffled", "absent",
        "patterned_high_load", "no_prefetch_high_load",
    }  # fmt: skip
    for name, phase in phases.items():
        assert phase["answered"] == phase["sent"] == 200, (name, phase)
    # Only the absent keys are answered with errors (unknown_key), and all of them are.
    assert phases["absent"]["errors"] == phases["absent"]["absent_requests"] > 0
    assert all(phases[p]["errors"] == 0 for p in phases if p != "absent")
