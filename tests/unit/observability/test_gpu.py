"""GPU metrics: gauges from NVML through a fake ``pynvml``, and nothing at all without NVML."""

from __future__ import annotations

import sys
import time
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from pipeline.observability import gpu
from pipeline.observability.gpu import GpuSampler
from pipeline.observability.metrics import Metrics


class NVMLError(Exception):
    pass


def fake_nvml(devices: list[dict[str, Any]], init_error: Exception | None = None) -> ModuleType:
    """A stand-in for ``pynvml`` with ``devices`` (util percent, used, total; None: unsupported)."""
    nvml = ModuleType("pynvml")
    nvml.NVMLError = NVMLError  # type: ignore[attr-defined]
    calls: list[str] = []
    nvml.calls = calls  # type: ignore[attr-defined]

    def init() -> None:
        calls.append("init")
        if init_error is not None:
            raise init_error

    def reading(index: int, key: str) -> Any:
        value = devices[index][key]
        if value is None:
            raise NVMLError("Not Supported")
        return value

    nvml.nvmlInit = init  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUtilizationRates = lambda h: SimpleNamespace(  # type: ignore[attr-defined]
        gpu=reading(h, "util"), memory=0
    )
    nvml.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(  # type: ignore[attr-defined]
        used=reading(h, "used"), total=devices[h]["total"], free=0
    )
    return nvml


def gpu_lines(registry: CollectorRegistry) -> list[str]:
    """The GPU samples in the exposition (not their HELP and TYPE comments)."""
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if line.startswith("sluice_gpu")]


def test_update_path() -> None:
    registry = CollectorRegistry()
    nvml = fake_nvml(
        [
            {"util": 87, "used": 30 * 2**30, "total": 80 * 2**30},
            {"util": None, "used": 2**20, "total": 16 * 2**30},  # no utilisation reading
        ]
    )
    sampler = GpuSampler(Metrics(registry), interval_s=1.0, nvml=nvml)
    assert sampler.sample() == 2

    def value(name: str, index: int) -> float | None:
        return registry.get_sample_value(name, {"gpu": str(index)})

    assert value("sluice_gpu_utilization_ratio", 0) == pytest.approx(0.87)
    assert value("sluice_gpu_memory_used_bytes", 0) == 30 * 2**30
    assert value("sluice_gpu_memory_total_bytes", 0) == 80 * 2**30
    assert value("sluice_gpu_utilization_ratio", 1) is None
    assert value("sluice_gpu_memory_used_bytes", 1) == 2**20
    assert value("sluice_gpu_memory_total_bytes", 1) == 16 * 2**30


def test_thread_samples_and_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = CollectorRegistry()
    devices = [{"util": 10, "used": 1, "total": 2}]
    nvml = fake_nvml(devices)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    sampler = GpuSampler(Metrics(registry), interval_s=0.01).start()
    try:
        assert sampler.running
        assert nvml.calls == ["init"]  # type: ignore[attr-defined]
        devices[0]["util"] = 55
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if registry.get_sample_value("sluice_gpu_utilization_ratio", {"gpu": "0"}) == 0.55:
                break
            time.sleep(0.01)
        assert registry.get_sample_value("sluice_gpu_utilization_ratio", {"gpu": "0"}) == 0.55
    finally:
        sampler.stop()
    assert not sampler.running
    assert nvml.calls == ["init", "shutdown"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("absent", ["no_module", "no_library"])
def test_degrades_to_nothing_without_nvml(monkeypatch: pytest.MonkeyPatch, absent: str) -> None:
    if absent == "no_module":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    else:
        nvml = fake_nvml([], init_error=NVMLError("NVML Shared Library Not Found"))
        monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert gpu.load_nvml() is None
    registry = CollectorRegistry()
    sampler = GpuSampler(Metrics(registry), interval_s=0.01).start()
    assert not sampler.running
    assert sampler.sample() == 0
    sampler.stop()
    # The families are declared, but there is no series to draw or alert on.
    assert gpu_lines(registry) == []


def test_a_driver_without_devices_starts_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml([])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    registry = CollectorRegistry()
    sampler = GpuSampler(Metrics(registry), interval_s=0.01).start()
    assert not sampler.running
    assert nvml.calls == ["init", "shutdown"]  # type: ignore[attr-defined]
    sampler.stop()
    assert gpu_lines(registry) == []


def test_real_pynvml_on_this_machine_never_raises() -> None:
    """Whatever this machine has (here: no NVIDIA driver), starting the sampler is safe."""
    sampler = GpuSampler(Metrics(CollectorRegistry()), interval_s=60).start()
    sampler.stop()
