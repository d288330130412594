"""`benchmarks.bench_prepare` on the CPU: every step's rate, and the engine's and the
preparation path's time per batch, wall and CPU."""

from __future__ import annotations

from benchmarks import bench_prepare


def test_prepare_steps_report_rates_and_time_per_batch() -> None:
    result = bench_prepare.run(batch=8, seconds=0.2, depth=2, compile_mode=None)
    assert result["decoder"] == "cpu" and result["batch"] == 8
    rates = result["images_per_s"]
    assert set(rates) == {"prepare", "worker", "engine", "bare_jpeg", "model"}
    assert all(rate > 0 for rate in rates.values())
    engine = result["engine_steps_ms"]
    for step in ("admit", "answer", "collect", "prepare_and_submit"):
        assert engine[step] > 0 and engine[f"{step}_cpu"] >= 0
    assert result["worker_steps_ms"]["prepare_and_submit"] > 0
