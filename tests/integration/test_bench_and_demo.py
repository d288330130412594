"""`sluice bench` in every mode and `sluice demo`, at small scale: correctness, not timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench
from pipeline.config import default_cache_dir
from pipeline.ops.broker import runtime_dir


@pytest.mark.parametrize("mode", ["fused", "split", "naive", "relay"])
def test_bench_answers_every_request(mode: str, settings) -> None:
    summary = bench.run(settings, mode, requests=300, rate=300.0, progress=False)
    assert summary["mode"] == mode
    assert summary["sent"] == summary["answered"] == 300
    assert summary["wrong_outputs"] == 0 and summary["duplicates"] == 0
    expected = "relayed" if mode == "relay" else "ok"
    assert summary["outcomes"] == {expected: 300}
    assert summary["throughput_rps"] > 0
    lat = summary["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    if mode in ("fused", "split"):
        assert summary["mean_batch_size"] >= 1


def test_bench_msgpack_payload(settings) -> None:
    summary = bench.run(settings, "fused", 300, rate=300.0, progress=False, payload="msgpack")
    assert summary["payload"] == "msgpack"
    assert summary["answered"] == 300 and summary["outcomes"] == {"ok": 300}
    assert summary["wrong_outputs"] == 0


@pytest.mark.parametrize("rate", [400.0, None])
def test_several_load_generators_keep_one_schedule(rate: float | None, settings) -> None:
    """Three generator processes send every request once, paced as one schedule (or as
    fast as they go), and each request's latency counts from its own due time."""
    summary = bench.run(settings, "fused", 600, rate=rate, progress=False, workers=2,
                        generators=3, payload="msgpack")  # fmt: skip
    assert summary["generators"] == 3
    assert summary["sent"] == summary["answered"] == 600
    assert summary["outcomes"] == {"ok": 600}
    assert summary["wrong_outputs"] == 0 and summary["duplicates"] == 0
    lat = summary["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    if rate is not None:
        # 600 requests due over 1.5 s: the span of the due times is the schedule's.
        assert summary["sent_rps"] == pytest.approx(rate, rel=0.01)


def test_scaling_run_reports_each_count_and_the_relay(settings) -> None:
    result = bench.scaling(settings, "fused", 2, 300, progress=False, generators=1)
    assert [r["workers"] for r in result["runs"]] == [1, 2]
    one, two = result["runs"]
    assert one["scaling_efficiency"] == pytest.approx(1.0, abs=1e-3)
    assert two["scaling_efficiency"] == pytest.approx(
        two["throughput_rps"] / (2 * one["throughput_rps"]), abs=1e-3
    )
    for r in result["runs"]:
        assert r["answered"] == r["sent"] == 2 * 300 * r["workers"]
        assert r["wrong_outputs"] == 0
        assert 0 < r["p50_ms"] <= r["p99_ms"]
    assert result["relay"]["workers"] == 2 and result["relay"]["throughput_rps"] > 0


def test_bench_cli_prints_json_last(settings) -> None:
    env = {**os.environ, **settings.to_env()}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "bench",
            "--mode",
            "fused",
            "--requests",
            "200",
            "--json",
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(summary) >= {
        "mode",
        "sent",
        "answered",
        "outcomes",
        "throughput_rps",
        "latency_ms",
        "mean_batch_size",
    }
    assert summary["answered"] == 200


def test_demo_starts_and_stops_its_own_broker(tmp_path: Path) -> None:
    """The main job from a bare cache: broker, topics, MiniLM, worker, text events,
    embeddings, the nearest-neighbour check and the summary."""
    cache = tmp_path / "cache"
    cache.mkdir()
    real_cache = Path(os.environ.get("SLUICE_CACHE_DIR") or default_cache_dir())
    runtime = runtime_dir(real_cache)
    (cache / runtime.name).symlink_to(runtime)  # reuse the fetched jars
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env["SLUICE_CACHE_DIR"] = str(cache)
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "demo", "--requests", "300", "--rate", "150"],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["answered"] == summary["sent"] == 300
    assert summary["wrong_outputs"] == 0
    assert "kafka: stopped" in out.stdout
    assert (cache / "models" / "minilm" / "1" / "hf" / "model.safetensors").exists()
    # Every demo sentence was answered, and the embeddings group them by topic.
    check = next(line for line in lines if "own topic" in line)
    assert int(check.split("/")[0]) >= 28, check
    state = cache / "broker" / "state.json"
    assert not state.exists(), "the demo left its broker running"
