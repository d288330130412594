"""Python handlers: the operator's own class for a model no other format covers.

A handler is trusted operator code, like a Triton Python backend or an MLServer custom
runtime: the config names it (``"handler": "package.module:Class"``, the module either a
``.py`` file in the version directory or an importable package), and the worker imports it
when the model loads. A message never names or carries code.

Each batch goes ``preprocess`` -> ``predict`` -> ``postprocess``; see `Handler`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.models.config import ModelConfig, ModelLoadError


class Handler:
    """Base class for a handler model. Override `predict`; the others have defaults.

    A batch's requests arrive as one dict per request, from input name to its value: a numpy
    array of the input's datatype and shape for numbers, a list of ``str`` (or ``bytes``
    that are not UTF-8) for a ``BYTES`` input. `postprocess` returns one array per output
    the config declares, each with one row per request (a dict by output name, or a list in
    the config's order). Raising `pipeline.RequestError` refuses the batch with that reason;
    any other exception is the batch's ``model_error``. A failing batch is split in halves
    until the failing request fails alone, as for every model.
    """

    config: ModelConfig
    path: Path
    device: torch.device

    def load(self, path: Path, device: torch.device, config: ModelConfig) -> None:
        """Called once when the model loads: read weights from ``path`` (the version
        directory), move them to ``device``."""

    def preprocess(self, requests: Sequence[Mapping[str, Any]]) -> Any:
        """The batch's requests into what `predict` takes (default: unchanged)."""
        return requests

    def predict(self, batch: Any) -> Any:
        raise NotImplementedError

    def postprocess(self, outputs: Any, n: int) -> Mapping[str, Any] | Sequence[Any]:
        """The model's outputs into one array per declared output, ``n`` rows each."""
        return outputs


def resolve(reference: str, path: Path) -> type[Handler]:
    """The class ``module:Class`` names: the module from ``<path>/<module>.py`` when that file
    exists, else imported by name."""
    module_name, _, class_name = reference.partition(":")
    local = path / (module_name.replace(".", "/") + ".py")
    if local.is_file():
        unique = f"sluice_handler_{abs(hash(str(local.resolve())))}_{module_name.replace('.', '_')}"
        spec = importlib.util.spec_from_file_location(unique, local)
        if spec is None or spec.loader is None:
            raise ModelLoadError(f"{local}: cannot be imported")
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ModelLoadError(f"handler {reference!r}: {module_name} has no class {class_name}")
    for method in ("preprocess", "predict", "postprocess"):
        if not callable(getattr(cls, method, None)):
            raise ModelLoadError(f"handler {reference!r} has no {method} method")
    return cls


def load(config: ModelConfig, path: Path, device: torch.device) -> Handler:
    assert config.handler is not None
    handler = resolve(config.handler, path)()
    handler.config, handler.path, handler.device = config, path, device
    loader = getattr(handler, "load", None)
    if callable(loader):
        loader(path, device, config)
    return handler


def run(handler: Handler, requests: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
    """One batch through a handler: one array per declared output, a row per request."""
    n = len(requests)
    out = handler.postprocess(handler.predict(handler.preprocess(requests)), n)
    specs = handler.config.outputs
    if isinstance(out, Mapping):
        missing = [s.name for s in specs if s.name not in out]
        if missing:
            raise ValueError(f"handler returned no outputs {missing} (got {sorted(out)})")
        values = [out[s.name] for s in specs]
    else:
        values = list(out)
        if len(values) != len(specs):
            raise ValueError(f"handler returned {len(values)} outputs, the config declares "
                             f"{len(specs)}")  # fmt: skip
    arrays = []
    for spec, value in zip(specs, values, strict=True):
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        array = np.asarray(value, dtype=object if spec.datatype == "BYTES" else None)
        if len(array) != n:
            raise ValueError(f"handler output {spec.name!r} has {len(array)} rows for {n} "
                             "requests")  # fmt: skip
        arrays.append(array)
    return arrays
