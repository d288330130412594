"""Versioned models from a model directory, loaded by real loading code.

Layout: ``<model_dir>/<name>/<version>/config.json`` beside one weights file:

- ``model.safetensors`` (format ``safetensors``): weights for a built-in architecture;
- ``model.pt`` (format ``state_dict``): the same, read with ``torch.load(weights_only=True)``
  so that no untrusted pickle is ever executed;
- ``model.ts`` (format ``torchscript``): a TorchScript module, no architecture needed.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.batching.scheduler import (
    BatchPolicy,
    bucket_for,
    check_buckets,
    default_buckets,
    pad_sequences,
)
from pipeline.models import zoo
from pipeline.models.runtime import (
    DEFAULT_POOL_BYTES,
    PRECISIONS,
    CudaMemoryMeter,
    DeviceStreams,
    GraphRunner,
    Pending,
    TensorPool,
    apply_precision,
    memory_bytes,
)
from pipeline.protocol.codec import (
    BAD_DTYPE,
    BAD_SHAPE,
    DTYPES,
    OVERSIZE,
    UNKNOWN_MODEL,
    UNKNOWN_VERSION,
    RequestError,
    Tensor,
    tensor_to_array,
)

log = logging.getLogger(__name__)

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


class ConcatMLP(MLP):
    """An MLP over its inputs concatenated: e.g. a request's query and the features the
    gateway attached for its key (pipeline/features)."""

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.net(torch.cat(inputs, dim=-1))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "concat_mlp": ConcatMLP,
    "bert_encoder": zoo.BertEncoder,
    "resnet": zoo.ResNet,
}


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


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class HostBatch:
    """A batch's inputs in pooled host buffers, padded to its buckets (mask included)."""

    tensors: list[torch.Tensor]
    n: int
    pool: TensorPool
    # Numpy views of the real rows of each client input (what clients sent, padded).
    arrays: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.arrays[i]

    def release(self) -> None:
        """Return the buffers to the pool (once)."""
        tensors, self.tensors = self.tensors, []
        for t in tensors:
            self.pool.give(t)


def _torch_dtype(datatype: str) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=DTYPES[datatype])).dtype


class LoadedModel:
    """One model version, ready to run on batches of numpy inputs.

    Args:
        pool: host buffers shared by the registry's models (own one by default).
        streams: the device's copy and compute streams (own ones by default).
        max_batch_size: the default when the config sets none.
    """

    def __init__(
        self,
        name: str,
        version: str,
        path: Path,
        device: torch.device,
        *,
        pool: TensorPool | None = None,
        streams: DeviceStreams | None = None,
        max_batch_size: int = 64,
    ) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.device = device
        self.config = cfg = ModelConfig.read(path / "config.json")
        self.max_batch_size = cfg.max_batch_size or max_batch_size
        if cfg.batch_buckets and not cfg.max_batch_size:  # the model's buckets bound it
            self.max_batch_size = min(self.max_batch_size, cfg.batch_buckets[-1])
        self.batch_buckets = cfg.batch_buckets or default_buckets(self.max_batch_size)
        self.seq_buckets = cfg.seq_buckets
        # What clients send: every input but the attention mask, which is made here.
        self.client_inputs = tuple(s for s in cfg.inputs if s.name != cfg.mask_input)
        self._client_index = {s.name: i for i, s in enumerate(self.client_inputs)}
        self._dtypes = [_torch_dtype(s.datatype) for s in cfg.inputs]
        self._out_dtypes = [_torch_dtype(s.datatype) for s in cfg.outputs]
        module = _load_module(cfg, path, device)
        label = f"model {name}:{version}"
        self.module, self.input_dtype = apply_precision(module, cfg.precision, device, label)
        if cfg.compile:
            self.module = _compile(self.module, self.shapes())
        # One CUDA graph per bucket shape, captured at warm-up: a batch is one launch.
        self.graphs: GraphRunner | None = None
        if cfg.cuda_graphs:
            if device.type == "cuda":
                self.graphs = GraphRunner(self.module, label)
            else:
                log.warning("%s: cuda_graphs needs CUDA; running eagerly on %s", label, device)
        self.pool = pool or TensorPool(pin=device.type == "cuda")
        self.streams = streams or DeviceStreams(device)
        # Measured at warm-up, seconds per batch bucket (at the longest sequence bucket).
        self.batch_time_s: dict[int, float] = {}
        self.memory_bytes = 0

    def shapes(self) -> list[tuple[int, int | None]]:
        """Every (batch bucket, sequence bucket) shape a batch of this model can have."""
        seqs: Sequence[int | None] = self.seq_buckets if self._variable() else (None,)
        return [(b, s) for b in self.batch_buckets for s in seqs]

    def _variable(self) -> bool:
        return any(s.variable_axis is not None for s in self.client_inputs)

    def policy(self, max_delay_s: float, default_ttl_s: float | None = None) -> BatchPolicy:
        """How the batcher flushes this model: its config's values over the settings'."""
        cfg = self.config
        delay = cfg.max_delay_ms / 1000.0 if cfg.max_delay_ms is not None else max_delay_s
        budget = cfg.time_budget_ms / 1000.0 if cfg.time_budget_ms is not None else None
        return BatchPolicy(self.max_batch_size, delay, self.batch_buckets, budget, default_ttl_s)

    def inputs_from_request(
        self, tensors: list[Tensor], max_elements: int, flat: bool = False
    ) -> list[Any]:
        """Check a request's tensors against this model's inputs; return one array per input.

        Each tensor's shape is the model's per-example shape, optionally with a leading 1; a
        variable (-1) dimension takes any length up to the largest sequence bucket. With
        ``flat``, a fixed-shape input may come back as the request's own flat list of numbers
        or raw bytes (already checked): `stack_inputs` converts a whole batch at once, which
        is far cheaper than one numpy conversion per request.
        """
        by_name = {t.name: t for t in tensors}
        if len(by_name) != len(tensors):
            raise RequestError(BAD_SHAPE, "inputs must have distinct names, got "
                               f"{[t.name for t in tensors]}")  # fmt: skip
        arrays: list[Any] = []
        for spec in self.client_inputs:
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
            if spec.variable_axis is not None:
                example = self._variable_shape(spec, shape)
                arrays.append(tensor_to_array(tensor, max_elements).reshape(example))
                continue
            if shape != spec.shape and shape != (1, *spec.shape):
                raise RequestError(
                    BAD_SHAPE,
                    f"input {spec.name!r} must have shape {list(spec.shape)}, got {list(shape)}",
                )
            data = tensor.data
            if flat and isinstance(data, bytes):
                arrays.append(_checked_bytes(tensor, spec, max_elements))
            elif (
                flat
                and spec.datatype in _FAST_DATATYPES
                and isinstance(data, list)
                and _flat_numbers(data, shape)
            ):
                arrays.append(data)
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

    def _variable_shape(self, spec: TensorSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The example shape of a variable-length tensor, or `RequestError` naming it."""
        if len(shape) == len(spec.shape) + 1 and shape[0] == 1:
            shape = shape[1:]
        limit = self.seq_buckets[-1]
        ok = len(shape) == len(spec.shape) and all(
            (1 <= d <= limit) if w == -1 else d == w for d, w in zip(shape, spec.shape, strict=True)
        )
        if not ok:
            raise RequestError(
                BAD_SHAPE,
                f"input {spec.name!r} must have shape {list(spec.shape)} with -1 in 1..{limit}, "
                f"got {list(shape)}",
            )
        return shape

    def stack_inputs(self, rows: Sequence[Sequence[Any]]) -> HostBatch:
        """A batch in pooled host buffers from each request's inputs (arrays, lists or bytes).

        The batch is padded to its batch-size bucket, and variable-length inputs to their
        sequence bucket, with the attention mask filled in ``mask_input``.
        """
        n = len(rows)
        bucket = bucket_for(n, self.batch_buckets)
        seq_len = None
        if self._variable():
            longest = max(
                r[self._client_index[s.name]].shape[s.variable_axis]
                for s in self.client_inputs
                if s.variable_axis is not None
                for r in rows
            )
            seq_len = bucket_for(longest, self.seq_buckets)
        batch = HostBatch([], n, self.pool)
        mask: np.ndarray | None = None
        try:
            for spec, dtype in zip(self.config.inputs, self._dtypes, strict=True):
                if spec.name == self.config.mask_input:
                    batch.tensors.append(torch.empty(0))  # filled below
                    continue
                axis = spec.variable_axis
                shape = spec.shape if axis is None else _with(spec.shape, axis, seq_len)
                buf = self.pool.take((bucket, *shape), dtype)
                batch.tensors.append(buf)
                view = buf.numpy()
                column = [r[self._client_index[spec.name]] for r in rows]
                if axis is not None:
                    assert seq_len is not None
                    _, row_mask = pad_sequences(column, (seq_len,), spec.pad, axis, out=view)
                    mask = row_mask if mask is None else mask
                    continue
                _fill(view, column, spec)
            if self.config.mask_input is not None:
                i = [s.name for s in self.config.inputs].index(self.config.mask_input)
                assert mask is not None and seq_len is not None
                buf = self.pool.take((bucket, seq_len), self._dtypes[i])
                buf.numpy()[...] = mask
                batch.tensors[i] = buf
            batch.arrays = [
                batch.tensors[i].numpy()[:n]
                for i, s in enumerate(self.config.inputs)
                if s.name != self.config.mask_input
            ]
        except BaseException:
            batch.release()
            raise
        return batch

    def submit(self, batch: HostBatch) -> Pending:
        """Start a batch; `Pending.result` returns one numpy array per output (real rows).

        The batch's buffers go back to the pool once the result is in; if this raises, the
        caller still owns them (to retry, or to `HostBatch.release`).

        On CUDA the inputs go host to device on the copy stream (non-blocking, from pinned
        buffers), the compute stream waits for them, and the outputs come back in one
        device-to-host copy into pooled buffers: the caller can prepare the next batch
        meanwhile. On CPU the same steps run at once.
        """
        n = batch.n
        with torch.inference_mode():
            if self.streams.compute is not None:
                return self._submit_cuda(batch)
            t0 = time.perf_counter()
            outs = self._outputs(self.module(*batch.tensors), n)
            elapsed = time.perf_counter() - t0
        inputs = {t.untyped_storage().data_ptr() for t in batch.tensors}
        # A model may hand back (a view of) its input, whose buffer is reused: copy that.
        outs = [o.clone() if o.untyped_storage().data_ptr() in inputs else o for o in outs]
        return Pending(outs, n, batch.release, elapsed_s=elapsed)

    def _submit_cuda(self, batch: HostBatch) -> Pending:
        copy, compute = self.streams.copy, self.streams.compute
        with torch.cuda.stream(copy):
            dev = [t.to(self.device, non_blocking=True) for t in batch.tensors]
            copied = torch.cuda.Event()
            copied.record(copy)
        compute.wait_event(copied)
        with torch.cuda.stream(compute):
            start = torch.cuda.Event(enable_timing=True)
            start.record(compute)
            for d in dev:
                d.record_stream(compute)  # allocated on the copy stream, used here
            if self.input_dtype is not None:
                dev = [d.to(self.input_dtype) if d.is_floating_point() else d for d in dev]
            out = self.graphs(dev) if self.graphs is not None else self.module(*dev)
            outs = self._outputs(out, batch.n)
            # Host buffers of the bucket's shape, not the batch's: a pinned allocation for
            # every new row count would synchronise the device each time.
            bucket = batch.tensors[0].shape[0] if batch.tensors else batch.n
            host = []
            for o in outs:
                h = self.pool.take((bucket, *o.shape[1:]), o.dtype)
                h[: batch.n].copy_(o, non_blocking=True)
                host.append(h)
            done = torch.cuda.Event(enable_timing=True)
            done.record(compute)
        return Pending(host, batch.n, batch.release, self.pool, start, done)

    def _outputs(self, out: Any, n: int) -> list[torch.Tensor]:
        """The real rows of each output, in the datatype its config names."""
        outs = out if isinstance(out, (tuple, list)) else (out,)
        result = []
        for i, o in enumerate(outs):
            o = o[:n]
            if i < len(self._out_dtypes) and o.dtype != self._out_dtypes[i]:
                o = o.to(self._out_dtypes[i])
            result.append(o.contiguous())
        return result

    def run(self, batch: HostBatch | Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run one batch; return one array per output.

        ``batch`` is a `HostBatch`, or one stacked array per client input (any number of
        rows: run in chunks of the largest batch bucket).
        """
        if isinstance(batch, HostBatch):
            return self.submit(batch).result()
        arrays = [np.asarray(a) for a in batch]
        n = len(arrays[0]) if arrays else 0
        step = min(self.max_batch_size, self.batch_buckets[-1])
        parts = []
        for lo in range(0, n, step):
            rows = [[a[i] for a in arrays] for i in range(lo, min(n, lo + step))]
            parts.append(self.submit(self.stack_inputs(rows)).result())
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate(p) for p in zip(*parts, strict=True)]

    def warm_up(self) -> None:
        """Run every (batch bucket x sequence bucket) shape once, and time it once more."""
        for bucket, seq_len in self.shapes():
            row = [
                np.zeros(
                    spec.shape
                    if seq_len is None
                    else _with(spec.shape, spec.variable_axis, seq_len),
                    dtype=DTYPES[spec.datatype],
                )  # fmt: skip
                for spec in self.client_inputs
            ]
            rows = [row] * bucket
            self.submit(self.stack_inputs(rows)).result()
            pending = self.submit(self.stack_inputs(rows))
            pending.result()
            known = self.batch_time_s.get(bucket, 0.0)
            self.batch_time_s[bucket] = max(known, pending.elapsed_s)


def _with(shape: tuple[int, ...], axis: int | None, length: int | None) -> tuple[int, ...]:
    if axis is None or length is None:
        return shape
    return (*shape[:axis], length, *shape[axis + 1 :])


def _fill(view: np.ndarray, column: list[Any], spec: TensorSpec) -> None:
    """Write a fixed-shape input's rows (arrays, flat lists, raw bytes) into ``view``."""
    n = len(column)
    dst = view[:n].reshape(n, -1)
    dtype = np.dtype(DTYPES[spec.datatype])
    if all(type(c) is bytes for c in column):
        dst[...] = np.frombuffer(b"".join(column), dtype=dtype.newbyteorder("<")).reshape(n, -1)
    else:
        le = dtype.newbyteorder("<")
        rows = [np.frombuffer(c, dtype=le) if type(c) is bytes else c for c in column]
        with np.errstate(over="ignore"):
            dst[...] = np.array(rows, dtype=dtype).reshape(n, -1)
    view[n:] = 0
    if dtype.kind == "f" and not np.isfinite(dst).all():
        # JSON holds no infinity: a value beyond the datatype's range overflowed.
        # One request alone is answered bad_dtype; a batch is bisected to find it.
        if n == 1:
            raise RequestError(
                BAD_DTYPE, f"input {spec.name!r}: data out of range for {spec.datatype}"
            )
        raise ValueError(f"input {spec.name!r}: values out of range in the batch")


def _checked_bytes(tensor: Tensor, spec: TensorSpec, max_elements: int) -> bytes:
    """A raw little-endian payload of the right size, kept as bytes until the batch stacks."""
    assert isinstance(tensor.data, bytes)
    expected = math.prod(spec.shape)
    if expected > max_elements:
        raise RequestError(
            OVERSIZE, f"input {tensor.name!r} has {expected} elements, limit is {max_elements}"
        )
    size = expected * np.dtype(DTYPES[spec.datatype]).itemsize
    if len(tensor.data) != size:
        raise RequestError(
            BAD_SHAPE,
            f"input {tensor.name!r}: shape {tensor.shape} of {tensor.datatype} needs "
            f"{size} bytes, data has {len(tensor.data)}",
        )
    return tensor.data


def _compile(module: nn.Module, shapes: list[tuple[int, int | None]]) -> nn.Module:
    """torch.compile with one static graph per bucket shape (warm-up compiles them all)."""
    import torch._dynamo.config as dynamo_config

    # Past the recompile limit dynamo silently runs eager: allow one graph per shape.
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        current = getattr(dynamo_config, name, None)
        if isinstance(current, int) and current < len(shapes) + 8:
            setattr(dynamo_config, name, len(shapes) + 8)
    return torch.compile(module, dynamic=False)  # type: ignore[return-value]


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
                    failed = self._failed.get(key)
                    if failed is not None:
                        raise ModelLoadError(str(failed))
                    try:
                        model = self._load(name, version)
                    except ModelLoadError as exc:
                        self._failed[key] = exc
                        raise
                    self._loaded[key] = model
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
                    model.memory_bytes = memory_bytes(model.module)
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
