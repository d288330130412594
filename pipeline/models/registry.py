"""Versioned models from a model directory, loaded by real loading code.

Layout: ``<model_dir>/<name>/<version>/config.json`` beside what its format reads:

- ``model.safetensors`` (format ``safetensors``): weights for a built-in architecture;
- ``model.pt`` (format ``state_dict``): the same, read with ``torch.load(weights_only=True)``
  so that no untrusted pickle is ever executed;
- ``model.ts`` (format ``torchscript``): a TorchScript module, no architecture needed;
- ``model.pt2`` (format ``export``): a ``torch.export`` program;
- ``model.onnx`` (format ``onnx``): an ONNX graph, run by onnxruntime;
- the files of a Hugging Face directory (format ``huggingface``);
- a handler's own files (format ``handler``), read by the operator's class.

`sluice model import` writes such a directory from an artifact (`pipeline.models.importer`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from pathlib import Path

import torch

from pipeline.models.config import ModelConfig, ModelLoadError
from pipeline.models.formats import artifact
from pipeline.models.loaded import LoadedModel, pick_device
from pipeline.models.runtime import (
    DEFAULT_POOL_BYTES,
    CudaMemoryMeter,
    DeviceStreams,
    TensorPool,
    memory_bytes,
)
from pipeline.protocol.codec import (
    UNKNOWN_MODEL,
    UNKNOWN_VERSION,
    RequestError,
)

log = logging.getLogger(__name__)


class ModelRegistry:
    """The models and versions found in a model directory, loaded on first use.

    Every model shares one host-buffer pool and the device's streams. A model that cannot be
    loaded (or exceeds its ``memory_budget_mb``) raises `ModelLoadError` on every request
    for it until `refresh`, without being loaded again; the others keep serving.

    Args:
        max_batch_size: the batch-size default for models whose config sets none.
        pool_bytes: bound on the idle pooled host buffers.
    """

    def __init__(
        self,
        model_dir: Path,
        device: torch.device | None = None,
        *,
        max_batch_size: int = 64,
        pool_bytes: int = DEFAULT_POOL_BYTES,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.device = device or pick_device()
        self._max_batch_size = max_batch_size
        self.pool = TensorPool(pool_bytes, pin=self.device.type == "cuda")
        self.streams = DeviceStreams(self.device)
        self._versions: dict[str, list[str]] = {}
        self._loaded: dict[tuple[str, str], LoadedModel] = {}
        self._failed: dict[tuple[str, str], ModelLoadError] = {}
        self._configs: dict[tuple[str, str], ModelConfig] = {}
        # What `resolve` answered for each (name, version asked), the version None included:
        # a request resolves in one lookup. Emptied whenever the versions or models change.
        self._resolved: dict[tuple[str, str | None], LoadedModel] = {}
        self._lock = threading.Lock()
        self._cuda_ready = False
        self.refresh()

    def refresh(self) -> None:
        """Rescan the directory for models and versions; failed loads may be tried again."""
        versions: dict[str, list[str]] = {}
        if self.model_dir.is_dir():
            for config in sorted(self.model_dir.glob("*/*/config.json")):
                name, version = config.parent.parent.name, config.parent.name
                versions.setdefault(name, []).append(version)
        for name in versions:
            versions[name].sort(key=_version_key)
        self._versions = versions
        self._resolved = {}
        self._failed.clear()

    @property
    def max_batch_size(self) -> int:
        """The batch-size default for models whose config sets none."""
        return self._max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, value: int) -> None:
        if value == self._max_batch_size:
            return
        self._max_batch_size = value
        with self._lock:
            # Loaded with the old default: loaded (and warmed over the new buckets) again on
            # their next request.
            for key, model in list(self._loaded.items()):
                if model.config.max_batch_size is None:
                    del self._loaded[key]
            self._resolved = {}

    @property
    def names(self) -> list[str]:
        return sorted(self._versions)

    def versions(self, name: str) -> list[str]:
        return list(self._versions.get(name, ()))

    @property
    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def resolve(self, name: str, version: str | None = None) -> LoadedModel:
        """The model for a request: newest version when none is named; loaded on first use."""
        resolved = self._resolved  # emptied by replacing it: a stale answer goes nowhere
        model = resolved.get((name, version))
        if model is not None:
            return model
        known = self._versions.get(name)
        if not known:
            raise RequestError(UNKNOWN_MODEL, f"unknown model {name!r}; serving {self.names}")
        asked = version
        if version is None:
            version = known[-1]
        elif version not in known:
            raise RequestError(
                UNKNOWN_VERSION, f"model {name!r} has no version {version!r}; has {known}"
            )
        key = (name, version)
        model = self._loaded.get(key)
        if model is None:
            with self._lock:
                model = self._loaded.get(key)
                if model is None:
                    failed = self._failed.get(key)
                    if failed is not None:
                        raise ModelLoadError(str(failed))
                    try:
                        model = self._load(name, version)
                    except ModelLoadError as exc:
                        self._failed[key] = exc
                        raise
                    self._loaded[key] = model
        resolved[(name, asked)] = model
        return model

    def _load(self, name: str, version: str) -> LoadedModel:
        """Load and warm up one version, within its memory budget."""
        path = self.model_dir / name / version
        cuda = self.device.type == "cuda"
        if cuda and not self._cuda_ready:
            # cuBLAS allocates its workspace (tens of MiB) on a stream's first matrix
            # product: charged here, not to whichever model happens to load first.
            with torch.cuda.stream(self.streams.compute):
                ones = torch.ones(16, 16, device=self.device)
                for dtype in (torch.float32, torch.float16):
                    ones.to(dtype) @ ones.to(dtype)
            torch.cuda.synchronize(self.device)
            self._cuda_ready = True
        meter = CudaMemoryMeter(self.device) if cuda else contextlib.nullcontext()
        model: LoadedModel | None = None
        try:
            with meter:
                model = LoadedModel(
                    name, version, path, self.device, pool=self.pool, streams=self.streams,
                    max_batch_size=self.max_batch_size,
                )  # fmt: skip
                if not cuda:  # a CPU model is refused before it runs
                    model.memory_bytes = _host_bytes(model)
                    self._check_budget(model)
                model.warm_up()
            if isinstance(meter, CudaMemoryMeter):
                model.memory_bytes = meter.peak_bytes
                self._check_budget(model)
        except ModelLoadError:
            del model
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            raise
        except Exception as exc:  # warm-up failed: the weights do not fit the config
            raise ModelLoadError(f"model {name}:{version} failed to warm up: {exc}") from exc
        return model

    @staticmethod
    def _check_budget(model: LoadedModel) -> None:
        budget = model.config.memory_budget_mb
        if budget is not None and model.memory_bytes > budget * 2**20:
            where = "GPU memory over load and warm-up" if model.device.type == "cuda" else (
                "parameter and buffer memory"
            )  # fmt: skip
            raise ModelLoadError(
                f"model {model.name}:{model.version} needs {model.memory_bytes / 2**20:.2f} MiB "
                f"of {where}, over its memory_budget_mb {budget}"
            )

    def config(self, name: str, version: str) -> ModelConfig:
        """A version's config, without loading its weights."""
        config = self._configs.get((name, version))
        if config is None:
            if version not in self._versions.get(name, ()):
                raise RequestError(UNKNOWN_VERSION, f"model {name!r} has no version {version!r}")
            config = ModelConfig.read(self.model_dir / name / version / "config.json")
            self._configs[(name, version)] = config
        return config

    def load_all(self) -> list[LoadedModel]:
        """Load every version now; one that fails is logged and refused on each request."""
        loaded = []
        for name in self.names:
            for version in self.versions(name):
                try:
                    loaded.append(self.resolve(name, version))
                except ModelLoadError as exc:
                    log.error("%s", exc)
        return loaded


def _host_bytes(model: LoadedModel) -> int:
    """What a CPU model holds: a torch module's parameters and buffers, else the size of
    the artifact its runtime read (an ONNX graph)."""
    if isinstance(model.module, torch.nn.Module):
        return memory_bytes(model.module)
    source = artifact(model.config, model.path)
    if source is None or not source.is_file():
        return 0
    return source.stat().st_size + sum(f.stat().st_size for f in source.parent.glob("*.data"))


def _version_key(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)
