"""One loader per model format, chosen by the config's ``format``:

- ``builtin``: safetensors or state-dict weights for a built-in architecture, TorchScript;
- ``export``: a ``torch.export`` program (``.pt2``);
- ``onnx``: an ONNX graph through onnxruntime (CPU, CUDA or TensorRT execution providers);
- ``huggingface``: a transformers / sentence-transformers directory, offline;
- ``handler``: the operator's Python class (trusted code named in the config).

Every loader returns what a batch's tensors are run through: an ``nn.Module``, or a callable
of torch tensors (ONNX), or a `Handler`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.models.config import FORMATS, ModelConfig, ModelLoadError
from pipeline.models.formats.handler import Handler


def artifact(config: ModelConfig, path: Path) -> Path | None:
    """The file (or directory) a version's format reads, or None (a handler)."""
    name = FORMATS[config.format]
    return None if name is None else path / name


def load_module(config: ModelConfig, path: Path, device: torch.device) -> Any:
    """What the version's batches run through, on ``device``; `ModelLoadError` if it cannot
    be loaded (the error names the file and why)."""
    source = artifact(config, path)
    if source is not None and not source.exists():
        raise ModelLoadError(f"{source} is missing")
    loader = _loader(config.format)
    try:
        return loader(config, path, device)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{source or path}: {type(exc).__name__}: {exc}") from exc


def _loader(fmt: str) -> Callable[[ModelConfig, Path, torch.device], Any]:
    load: Callable[[ModelConfig, Path, torch.device], Any]
    if fmt in ("safetensors", "state_dict", "torchscript"):
        from pipeline.models.formats.builtin import load

        return load
    if fmt == "export":
        from pipeline.models.formats.export import load

        return load
    if fmt == "onnx":
        from pipeline.models.formats.onnx import load

        return load
    if fmt == "huggingface":
        from pipeline.models.formats.huggingface import load

        return load
    from pipeline.models.formats.handler import load

    return load


__all__ = ["Handler", "artifact", "load_module"]
