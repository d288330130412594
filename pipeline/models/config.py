"""A model's ``config.json``: its format, tensors, batching and runtime options, checked
with an error that names the bad value."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.batching.scheduler import (
    check_buckets,
)
from pipeline.errors import SluiceError
from pipeline.models.architectures import ARCHITECTURES
from pipeline.models.runtime import (
    PRECISIONS,
)
from pipeline.protocol.codec import (
    DTYPES,
)

log = logging.getLogger(__name__)


class ModelLoadError(SluiceError, RuntimeError):
    """A model directory entry that cannot be loaded."""


FORMATS = {"safetensors": "model.safetensors", "state_dict": "model.pt", "torchscript": "model.ts"}


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output; -1 in ``shape`` marks a variable (sequence) dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    pad: float = 0

    @property
    def variable_axis(self) -> int | None:
        return self.shape.index(-1) if -1 in self.shape else None


@dataclass(frozen=True)
class ModelConfig:
    """The contents of a version's ``config.json``."""

    format: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    arch: str | None = None
    arch_config: dict[str, Any] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    # Runtime options (README "Model config"): all optional.
    precision: str = "fp32"
    compile: bool = False
    cuda_graphs: bool = False
    batch_buckets: tuple[int, ...] = ()
    seq_buckets: tuple[int, ...] = ()
    mask_input: str | None = None
    memory_budget_mb: float | None = None
    max_batch_size: int | None = None
    max_delay_ms: float | None = None
    time_budget_ms: float | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true or false, got {self.compile!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be true or false, got {self.cuda_graphs!r}")
        if self.batch_buckets:
            object.__setattr__(
                self, "batch_buckets", check_buckets("batch_buckets", self.batch_buckets)
            )
        if self.seq_buckets:
            object.__setattr__(self, "seq_buckets", check_buckets("seq_buckets", self.seq_buckets))
        for s in self.inputs:
            if s.shape.count(-1) > 1:
                raise ValueError(f"input {s.name!r} may have one variable (-1) dimension, "
                                 f"got shape {list(s.shape)}")  # fmt: skip
            if s.variable_axis is not None and not self.seq_buckets:
                raise ValueError(
                    f"input {s.name!r} has a variable dimension: seq_buckets must be set"
                )
        if self.mask_input is not None:
            spec = next((s for s in self.inputs if s.name == self.mask_input), None)
            if spec is None or spec.shape != (-1,):
                raise ValueError(
                    f"mask_input must name an input of shape [-1], got {self.mask_input!r}"
                )
            if not any(s.variable_axis is not None for s in self.inputs if s is not spec):
                raise ValueError(f"mask_input {self.mask_input!r} needs a variable-length input")
        _positive("memory_budget_mb", self.memory_budget_mb)
        _positive("time_budget_ms", self.time_budget_ms)
        _positive("max_delay_ms", self.max_delay_ms, zero_ok=True)
        n = self.max_batch_size
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"max_batch_size must be an integer >= 1, got {n!r}")

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
                **{k: _option(k, raw[k]) for k in _OPTIONS if k in raw},
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{path}: invalid model config ({exc})") from exc
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
            out = {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
            return {**out, "pad": s.pad} if s.pad else out

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
        for name in _OPTIONS:
            value = getattr(self, name)
            if value != _OPTION_DEFAULTS[name]:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out


_OPTIONS = (
    "precision", "compile", "cuda_graphs", "batch_buckets", "seq_buckets", "mask_input",
    "memory_budget_mb", "max_batch_size", "max_delay_ms", "time_budget_ms",
)  # fmt: skip
_OPTION_DEFAULTS = {
    "precision": "fp32", "compile": False, "cuda_graphs": False, "batch_buckets": (),
    "seq_buckets": (), "mask_input": None, "memory_budget_mb": None, "max_batch_size": None,
    "max_delay_ms": None, "time_budget_ms": None,
}  # fmt: skip


def _option(name: str, value: Any) -> Any:
    if name in ("batch_buckets", "seq_buckets"):
        if not isinstance(value, list):
            raise ValueError(f"{name} must be a list of integers, got {value!r}")
        return tuple(value)
    return value


def _positive(name: str, value: Any, zero_ok: bool = False) -> None:
    if value is None:
        return
    bad = not isinstance(value, (int, float)) or isinstance(value, bool)
    if bad or value < 0 or (value == 0 and not zero_ok) or not math.isfinite(value):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{name} must be a number {bound}, got {value!r}")


def _spec(raw: dict[str, Any]) -> TensorSpec:
    if raw["datatype"] not in DTYPES:
        raise ValueError(f"unknown datatype {raw['datatype']!r}")
    shape = tuple(int(d) for d in raw["shape"])
    if any(d < 1 and d != -1 for d in shape):
        raise ValueError(f"shape of {raw['name']!r} must hold sizes >= 1 or -1, got {list(shape)}")
    pad = raw.get("pad", 0)
    if not isinstance(pad, (int, float)) or isinstance(pad, bool):
        raise ValueError(f"pad of {raw['name']!r} must be a number, got {pad!r}")
    return TensorSpec(str(raw["name"]), str(raw["datatype"]), shape, pad)
