"""`benchmarks.bench_paths` on the CPU: the eager path's figure, and a path this machine lacks
reported with its reason rather than a number."""

from __future__ import annotations

from benchmarks import bench_paths


def test_paths_report_a_figure_or_why_not() -> None:
    result = bench_paths.run(batch=4, seconds=0.05, paths=["eager", "onnx-tensorrt"])
    assert result["scenario"] == "paths" and result["batch"] == 4
    for name in ("bert", "resnet"):
        eager = result["models"][name]["eager"]
        assert eager["bare_rps"] > 0 and eager["load_s"] >= 0
        missing = result["models"][name]["onnx-tensorrt"]
        assert isinstance(missing, str) and missing.startswith(("unavailable", "export failed"))
