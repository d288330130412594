"""A model loaded onto its device: request tensors checked against its inputs, host
batches stacked into pinned buffers, submitted to the device and split back per request."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.batching.scheduler import (
    BatchPolicy,
    bucket_for,
    default_buckets,
    pad_sequences,
)
from pipeline.models.config import ModelConfig, TensorSpec
from pipeline.models.loaders import load_module
from pipeline.models.runtime import (
    DeviceStreams,
    GraphRunner,
    Pending,
    TensorPool,
    apply_precision,
)
from pipeline.protocol.codec import (
    BAD_DTYPE,
    BAD_SHAPE,
    DTYPES,
    OVERSIZE,
    RequestError,
    Tensor,
    tensor_to_array,
)

log = logging.getLogger(__name__)


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
        module = load_module(cfg, path, device)
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
