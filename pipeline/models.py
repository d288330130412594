"""Versioned models from a model directory, loaded by real loading code.

Layout: ``<model_dir>/<name>/<version>/config.json`` beside one weights file:

- ``model.safetensors`` (format ``safetensors``): weights for a built-in architecture;
- ``model.pt`` (format ``state_dict``): the same, read with ``torch.load(weights_only=True)``
  so that no untrusted pickle is ever executed;
- ``model.ts`` (format ``torchscript``): a TorchScript module, no architecture needed.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.codec import (
    BAD_DTYPE,
    BAD_SHAPE,
    DTYPES,
    UNKNOWN_MODEL,
    UNKNOWN_VERSION,
    RequestError,
    Tensor,
    tensor_to_array,
)

FORMATS = {"safetensors": "model.safetensors", "state_dict": "model.pt", "torchscript": "model.ts"}


class ModelLoadError(RuntimeError):
    """A model directory entry that cannot be loaded."""


# -- built-in architectures (for weights-only formats) ------------------------------------


class MLP(nn.Module):
    """A small multilayer perceptron classifier: the demo and test model."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"mlp": MLP}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelConfig:
    """The contents of a version's ``config.json``."""

    format: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    arch: str | None = None
    arch_config: dict[str, Any] = field(default_factory=dict)
    labels: tuple[str, ...] = ()

    @classmethod
    def read(cls, path: Path) -> ModelConfig:
        try:
            raw = json.loads(path.read_text())
            cfg = cls(
                format=raw["format"],
                inputs=tuple(_spec(s) for s in raw["inputs"]),
                outputs=tuple(_spec(s) for s in raw["outputs"]),
                arch=raw.get("arch"),
                arch_config=dict(raw.get("arch_config", {})),
                labels=tuple(raw.get("labels", ())),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{path}: invalid model config ({exc!r})") from exc
        if cfg.format not in FORMATS:
            raise ModelLoadError(
                f"{path}: format must be one of {list(FORMATS)}, got {cfg.format!r}"
            )
        if cfg.format != "torchscript" and cfg.arch not in ARCHITECTURES:
            raise ModelLoadError(
                f"{path}: arch must be one of {list(ARCHITECTURES)}, got {cfg.arch!r}"
            )
        return cfg

    def to_json(self) -> dict[str, Any]:
        def spec(s: TensorSpec) -> dict[str, Any]:
            return {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}

        out: dict[str, Any] = {
            "format": self.format,
            "inputs": [spec(s) for s in self.inputs],
            "outputs": [spec(s) for s in self.outputs],
        }
        if self.arch:
            out["arch"] = self.arch
            out["arch_config"] = self.arch_config
        if self.labels:
            out["labels"] = list(self.labels)
        return out


def _spec(raw: dict[str, Any]) -> TensorSpec:
    if raw["datatype"] not in DTYPES:
        raise ValueError(f"unknown datatype {raw['datatype']!r}")
    return TensorSpec(str(raw["name"]), str(raw["datatype"]), tuple(int(d) for d in raw["shape"]))


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LoadedModel:
    """One model version, ready to run on batches of numpy inputs."""

    def __init__(self, name: str, version: str, path: Path, device: torch.device) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.device = device
        self.config = ModelConfig.read(path / "config.json")
        self.module = _load_module(self.config, path, device)

    def inputs_from_request(
        self, tensors: list[Tensor], max_elements: int, flat: bool = False
    ) -> list[Any]:
        """Check a request's tensors against this model's inputs; return one array per input.

        Each tensor's shape is the model's per-example shape, optionally with a leading 1.
        With ``flat``, an input may come back as the request's own flat list of numbers
        (already checked) or a flat array: `stack_inputs` converts a whole batch at once,
        which is far cheaper than one numpy conversion per request.
        """
        by_name = {t.name: t for t in tensors}
        if len(by_name) != len(tensors):
            raise RequestError(BAD_SHAPE, "inputs must have distinct names, got "
                               f"{[t.name for t in tensors]}")  # fmt: skip
        arrays: list[Any] = []
        for spec in self.config.inputs:
            tensor = by_name.pop(spec.name, None)
            if tensor is None:
                raise RequestError(
                    BAD_SHAPE,
                    f"model {self.name}:{self.version} needs input "
                    f"{spec.name!r}, got {[t.name for t in tensors]}",
                )
            if tensor.datatype != spec.datatype:
                raise RequestError(
                    BAD_DTYPE, f"input {spec.name!r} must be {spec.datatype}, got {tensor.datatype}"
                )
            shape = tuple(tensor.shape)
            if shape != spec.shape and shape != (1, *spec.shape):
                raise RequestError(
                    BAD_SHAPE,
                    f"input {spec.name!r} must have shape {list(spec.shape)}, got {list(shape)}",
                )
            if (
                flat
                and spec.datatype in _FAST_DATATYPES
                and isinstance(tensor.data, list)
                and _flat_numbers(tensor.data, shape)
            ):
                arrays.append(tensor.data)
            elif flat:
                arrays.append(tensor_to_array(tensor, max_elements).reshape(-1))
            else:
                arrays.append(tensor_to_array(tensor, max_elements).reshape(spec.shape))
        if by_name:
            raise RequestError(
                BAD_SHAPE,
                f"unexpected inputs {sorted(by_name)} for model {self.name}:{self.version}",
            )
        return arrays

    def stack_inputs(self, rows: Sequence[Sequence[Any]]) -> list[np.ndarray]:
        """One batch array per input from each request's inputs (arrays or flat lists)."""
        batch = []
        for i, spec in enumerate(self.config.inputs):
            with np.errstate(over="ignore"):
                column = np.array([r[i] for r in rows], dtype=DTYPES[spec.datatype])
            if column.dtype.kind == "f" and not np.isfinite(column).all():
                # JSON holds no infinity: a value beyond the datatype's range overflowed.
                # One request alone is answered bad_dtype; a batch is bisected to find it.
                if len(rows) == 1:
                    raise RequestError(
                        BAD_DTYPE, f"input {spec.name!r}: data out of range for {spec.datatype}"
                    )
                raise ValueError(f"input {spec.name!r}: values out of range in the batch")
            batch.append(column.reshape(len(rows), *spec.shape))
        return batch

    def run(self, batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run one batch (one stacked array per input); return one array per output."""
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in batch]
            out = self.module(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().to("cpu").numpy() for o in outs]

    def warm_up(self) -> None:
        dummy = [np.zeros((1, *s.shape), dtype=DTYPES[s.datatype]) for s in self.config.inputs]
        self.run(dummy)


_FAST_DATATYPES = frozenset({"FP32", "FP64"})


def _flat_numbers(data: list[Any], shape: tuple[int, ...]) -> bool:
    """A flat list of exactly prod(shape) ints and floats (JSON has no NaN or infinity)."""
    if len(data) != math.prod(shape):
        return False
    for v in data:
        t = type(v)
        if t is not float and t is not int:
            return False
    return True


def _load_module(config: ModelConfig, path: Path, device: torch.device) -> nn.Module:
    weights = path / FORMATS[config.format]
    if not weights.exists():
        raise ModelLoadError(f"{weights} is missing")
    try:
        if config.format == "torchscript":
            module = torch.jit.load(str(weights), map_location=device)
        else:
            assert config.arch is not None
            module = ARCHITECTURES[config.arch](**config.arch_config)
            if config.format == "safetensors":
                from safetensors.torch import load_file

                state = load_file(str(weights), device="cpu")
            else:
                state = torch.load(weights, map_location="cpu", weights_only=True)
            module.load_state_dict(state)
            module.to(device)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{weights}: {exc}") from exc
    module.eval()
    return module


class ModelRegistry:
    """The models and versions found in a model directory, loaded on first use."""

    def __init__(self, model_dir: Path, device: torch.device | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.device = device or pick_device()
        self._versions: dict[str, list[str]] = {}
        self._loaded: dict[tuple[str, str], LoadedModel] = {}
        self._configs: dict[tuple[str, str], ModelConfig] = {}
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        """Rescan the directory for models and versions."""
        versions: dict[str, list[str]] = {}
        if self.model_dir.is_dir():
            for config in sorted(self.model_dir.glob("*/*/config.json")):
                name, version = config.parent.parent.name, config.parent.name
                versions.setdefault(name, []).append(version)
        for name in versions:
            versions[name].sort(key=_version_key)
        self._versions = versions

    @property
    def names(self) -> list[str]:
        return sorted(self._versions)

    def versions(self, name: str) -> list[str]:
        return list(self._versions.get(name, ()))

    def resolve(self, name: str, version: str | None = None) -> LoadedModel:
        """The model for a request: newest version when none is named; loaded on first use."""
        known = self._versions.get(name)
        if not known:
            raise RequestError(UNKNOWN_MODEL, f"unknown model {name!r}; serving {self.names}")
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
                    model = LoadedModel(name, version, self.model_dir / name / version, self.device)
                    model.warm_up()
                    self._loaded[key] = model
        return model

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
        return [self.resolve(n, v) for n in self.names for v in self.versions(n)]


def _version_key(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)


# -- the demo model -------------------------------------------------------------------------

DEMO_LABELS = ("north", "east", "south", "west")
DEMO_FEATURES = 16


def save_model(
    model_dir: Path, name: str, version: str, module: nn.Module, config: ModelConfig
) -> Path:
    """Save a module in the config's format under ``<model_dir>/<name>/<version>``."""
    path = Path(model_dir) / name / version
    path.mkdir(parents=True, exist_ok=True)
    weights = path / FORMATS[config.format]
    if config.format == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(weights))
    elif config.format == "state_dict":
        torch.save(module.state_dict(), weights)
    else:
        torch.jit.save(torch.jit.script(module), str(weights))
    (path / "config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")
    return path


def demo_config(fmt: str = "safetensors") -> ModelConfig:
    return ModelConfig(
        format=fmt,
        inputs=(TensorSpec("features", "FP32", (DEMO_FEATURES,)),),
        outputs=(TensorSpec("logits", "FP32", (len(DEMO_LABELS),)),),
        arch="mlp",
        arch_config={
            "in_features": DEMO_FEATURES,
            "hidden": [32],
            "out_features": len(DEMO_LABELS),
        },
        labels=DEMO_LABELS,
    )


def init_demo(model_dir: Path, name: str = "demo", force: bool = False) -> list[Path]:
    """Build the demo classifier: version 1 as safetensors, version 2 as a state dict."""
    paths = []
    for version, fmt, seed in (("1", "safetensors", 1), ("2", "state_dict", 2)):
        path = Path(model_dir) / name / version
        if (path / "config.json").exists() and not force:
            paths.append(path)
            continue
        torch.manual_seed(seed)
        cfg = demo_config(fmt)
        paths.append(save_model(model_dir, name, version, MLP(**cfg.arch_config), cfg))
    return paths
