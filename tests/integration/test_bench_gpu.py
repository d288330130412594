"""`sluice bench --scenario gpu` on a machine without a GPU: tiny versions of both reference
models, bare and through the real broker; correctness and the JSON contract, not timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline.config import Settings


def test_gpu_scenario_prints_per_model_figures(settings: Settings) -> None:
    env = {**os.environ, **settings.to_env()}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "bench",
            "--scenario",
            "gpu",
            "--requests",
            "300",
            "--no-progress",
        ],  # fmt: skip
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["scenario"] == "gpu"
    assert result["device"] == ("cpu" if not torch.cuda.is_available() else result["device"])
    assert set(result["models"]) == {"bert", "resnet"}
    for name, figures in result["models"].items():
        # Two runs per model: at the maximum rate, then at 75 % of it.
        assert figures["sent"] == figures["answered"] == 600, name
        assert figures["wrong_outputs"] == 0, name
        assert figures["bare_rps"] > 0 and figures["pipeline_rps"] > 0
        assert figures["ratio"] == pytest.approx(
            figures["pipeline_rps"] / figures["bare_rps"], abs=2e-3
        )
        assert figures["p99_ms"] >= figures["p50_ms"] > 0
        assert figures["mean_batch_size"] >= 1
        if not torch.cuda.is_available():
            assert figures["gpu_util"] is None  # no NVML: no made-up utilisation


@pytest.mark.timeout(600)
def test_gpu_scaling_runs_one_worker_per_gpu_for_each_n(settings: Settings) -> None:
    """``--gpus 2``: N = 1 and 2, one fused worker per GPU in one group (on this CPU
    machine the workers share the CPU: the contract, not the scaling, is checked)."""
    env = {**os.environ, **settings.to_env()}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "bench",
            "--scenario",
            "gpu",
            "--gpus",
            "2",
            "--requests",
            "200",
            "--no-progress",
        ],  # fmt: skip
        env=env,
        capture_output=True,
        text=True,
        timeout=550,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert [run["gpus"] for run in result["runs"]] == [1, 2]
    for run in result["runs"]:
        n = run["gpus"]
        assert set(run["models"]) == {"bert", "resnet"}
        for name, figures in run["models"].items():
            assert figures["sent"] == figures["answered"] == 2 * 200 * n, (n, name)
            assert figures["wrong_outputs"] == 0 and figures["workers"] == n
            one = result["runs"][0]["models"][name]["pipeline_rps"]
            assert figures["scaling_efficiency"] == pytest.approx(
                figures["pipeline_rps"] / (n * one), abs=2e-3
            )


@pytest.mark.timeout(600)
def test_jpeg_scenario_sends_jpeg_bytes_and_reports_three_tails(settings: Settings) -> None:
    """``--scenario jpeg``: ResNet's requests carry JPEGs (decoded by Pillow on this CPU
    machine), its baselines are bare JPEG and bare model, and each model has the p99s of
    three runs at 75 % of its maximum."""
    env = {**os.environ, **settings.to_env()}
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "bench", "--scenario", "jpeg",
         "--requests", "150", "--no-progress"],
        env={**env, "SLUICE_BENCH_DECODE": "auto"}, capture_output=True, text=True, timeout=550,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["scenario"] == "jpeg" and set(result["models"]) == {"bert", "resnet"}
    for name, figures in result["models"].items():
        # The maximum, then three runs at 75 % of it.
        assert figures["sent"] == figures["answered"] == 4 * 150, name
        assert figures["wrong_outputs"] == 0, name
        assert len(figures["p99_ms_runs"]) == 3
        assert figures["p99_ms"] == pytest.approx(max(figures["p99_ms_runs"]), rel=1e-4)
        assert figures["ratio"] == pytest.approx(
            figures["pipeline_rps"] / figures["bare_rps"], abs=2e-3
        )
    resnet = result["models"]["resnet"]
    if not torch.cuda.is_available():
        assert resnet["decoder"] == "cpu" and set(resnet["bare_jpeg_rps"]) == {"pil"}
    assert resnet["bare_rps"] == pytest.approx(max(resnet["bare_jpeg_rps"].values()), rel=1e-4)
    assert resnet["bare_model_rps"] > 0
    assert resnet["jpeg_over_model"] == pytest.approx(
        resnet["bare_rps"] / resnet["bare_model_rps"], abs=2e-3
    )
