"""GPU utilisation and memory from NVML (``pynvml``, package nvidia-ml-py) as gauges.

Where NVML is absent (no NVIDIA driver, as on CPU-only machines) the sampler does nothing:
no error, no thread and no series, so that dashboards show no GPU rather than a zero one.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from types import ModuleType
from typing import Any

from pipeline.observability.metrics import Metrics

log = logging.getLogger(__name__)


def load_nvml() -> ModuleType | None:
    """The initialised ``pynvml`` module, or None where NVML cannot be used."""
    try:
        nvml = importlib.import_module("pynvml")
        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - ImportError, or NVMLError of any kind
        log.debug("no GPU metrics: %s", exc)
        return None
    return nvml


class GpuSampler:
    """Samples every NVML device every ``interval_s`` on a daemon thread.

    Gauges, labelled by the NVML device index: ``sluice_gpu_utilization_ratio`` (0..1, the
    share of the last sample period in which a kernel ran), ``sluice_gpu_memory_used_bytes``
    and ``sluice_gpu_memory_total_bytes``. A reading a device does not support is left out.
    """

    def __init__(self, metrics: Metrics, interval_s: float, nvml: Any | None = None) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self.nvml = nvml
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        """Read every device once into the gauges; returns how many devices there are."""
        nvml = self.nvml
        if nvml is None:
            return 0
        m = self.metrics
        count = int(nvml.nvmlDeviceGetCount())
        for index in range(count):
            gpu = str(index)
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
            except nvml.NVMLError as exc:
                log.debug("GPU %s: %s", gpu, exc)
                continue
            with contextlib.suppress(nvml.NVMLError):
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                m.gpu_utilization.labels(gpu).set(rates.gpu / 100.0)
            with contextlib.suppress(nvml.NVMLError):
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                m.gpu_memory_used.labels(gpu).set(memory.used)
                m.gpu_memory_total.labels(gpu).set(memory.total)
        return count

    def start(self) -> GpuSampler:
        """Start sampling, unless NVML is absent (then this does nothing)."""
        if self.nvml is None:
            self.nvml = load_nvml()
        if self.nvml is None:
            return self
        try:
            count = int(self.nvml.nvmlDeviceGetCount())
        except Exception as exc:  # noqa: BLE001 - NVMLError of any kind: no GPU metrics
            log.debug("no GPU metrics: %s", exc)
            count = 0
        if count == 0:  # a driver but no device: nothing to sample, no thread
            with contextlib.suppress(Exception):
                self.nvml.nvmlShutdown()
            self.nvml = None
            return self
        self._thread = threading.Thread(target=self._run, name="sluice-gpu", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - a failed sample must not end sampling
                log.warning("GPU sample failed: %s", exc)
            self._stop.wait(self.interval_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
            with contextlib.suppress(Exception):
                self.nvml.nvmlShutdown()  # type: ignore[union-attr]
