"""A model's inputs: request tensors checked against its input specs (datatype, shape,
variable lengths up to the largest sequence bucket), and batches stacked into pooled host
buffers, padded to their buckets, with the attention mask filled in."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.batching.scheduler import (
    bucket_for,
    pad_sequences,
)
from pipeline.models.config import ModelConfig, TensorSpec
from pipeline.models.runtime import (
    TensorPool,
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


def torch_dtype(datatype: str) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=DTYPES[datatype])).dtype


class Inputs:
    """A model's inputs as clients send them: request tensors checked against the model's
    specs, and a batch of requests stacked into pooled host buffers, padded to its buckets."""

    def __init__(
        self,
        label: str,
        config: ModelConfig,
        batch_buckets: Sequence[int],
        seq_buckets: Sequence[int],
        pool: TensorPool,
    ) -> None:
        self.name, self.version = label.split(":", 1)
        self.config = config
        self.batch_buckets = batch_buckets
        self.seq_buckets = seq_buckets
        self.pool = pool
        # What clients send: every input but the attention mask, which is made here.
        self.client_inputs = tuple(s for s in config.inputs if s.name != config.mask_input)
        self._client_index = {s.name: i for i, s in enumerate(self.client_inputs)}
        self._dtypes = [torch_dtype(s.datatype) for s in config.inputs]

    @property
    def variable(self) -> bool:
        """Whether some input takes a variable length (padded to a sequence bucket)."""
        return any(s.variable_axis is not None for s in self.client_inputs)

    def from_request(
        self, tensors: list[Tensor], max_elements: int, flat: bool = False
    ) -> list[Any]:
        """Check a request's tensors against this model's inputs; return one array per input.

        Each tensor's shape is the model's per-example shape, optionally with a leading 1; a
        variable (-1) dimension takes any length up to the largest sequence bucket. With
        ``flat``, a fixed-shape input may come back as the request's own flat list of numbers
        or raw bytes (already checked): `stack` converts a whole batch at once, which
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

    def stack(self, rows: Sequence[Sequence[Any]]) -> HostBatch:
        """A batch in pooled host buffers from each request's inputs (arrays, lists or bytes).

        The batch is padded to its batch-size bucket, and variable-length inputs to their
        sequence bucket, with the attention mask filled in ``mask_input``.
        """
        n = len(rows)
        bucket = bucket_for(n, self.batch_buckets)
        seq_len = None
        if self.variable:
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
                shape = spec.shape if axis is None else with_length(spec.shape, axis, seq_len)
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


def with_length(shape: tuple[int, ...], axis: int | None, length: int | None) -> tuple[int, ...]:
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
