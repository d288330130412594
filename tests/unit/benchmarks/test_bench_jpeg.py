"""The JPEG bench's scale: what the environment may change for a device run."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_jpeg


def test_the_environment_picks_decoder_compile_runs_and_resnet_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda = torch.device("cuda")
    default = bench_jpeg.scale_for(cuda)
    assert default.model_batch == {"resnet": 128} and default.p99_runs == 3
    assert default.compile is False and default.jpeg is not None
    assert default.jpeg.decode == "auto" and default.jpeg.size == (224, 224)
    monkeypatch.setenv("SLUICE_BENCH_DECODE", "nvimgcodec")
    monkeypatch.setenv("SLUICE_BENCH_COMPILE", "default")
    monkeypatch.setenv("SLUICE_BENCH_P99_RUNS", "1")
    monkeypatch.setenv("SLUICE_BENCH_RESNET_BATCH", "256")
    scale = bench_jpeg.scale_for(cuda)
    assert scale.jpeg is not None and scale.jpeg.decode == "nvimgcodec"
    assert scale.compile == "default" and scale.p99_runs == 1
    assert scale.model_batch == {"resnet": 256}
    assert bench_jpeg.GPU.model_batch == {"resnet": 128}  # the module's scale is untouched
    cpu = bench_jpeg.scale_for(torch.device("cpu"))
    assert cpu.jpeg is not None and cpu.jpeg.size == (32, 32)
