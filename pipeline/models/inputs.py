"""A model's inputs: request tensors checked against its input specs (datatype, shape,
variable lengths up to the largest sequence bucket), and batches stacked into pooled host
buffers, padded to their buckets, with the attention mask filled in.

A model whose requests carry text, images or records rather than its tensors has a
preparer (`pipeline.models.text`, `images`, `records`): admission checks each request's
value cheaply, and the batch is prepared (tokenized, decoded) a batch at a time when it
starts, into the same pooled buffers. A handler model's batches are the requests' values,
handed to the handler as they are."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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
    # Per-row notes from preparing the batch, e.g. ``truncated`` (bool per row).
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    # A handler model's batch: each request's inputs by name, as the handler takes them.
    requests: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.arrays[i]

    def release(self) -> None:
        """Return the host buffers to the pool (once); device tensors are simply dropped."""
        tensors, self.tensors = self.tensors, []
        for t in tensors:
            if not t.is_cuda:
                self.pool.give(t)


@dataclass
class Stacking:
    """A batch `Inputs.begin` started: `done` once `result` would not wait for it."""

    preparing: Any  # `pipeline.models.images.Preparing`
    n: int
    pool: TensorPool

    def done(self) -> bool:
        return bool(self.preparing.done())

    def result(self) -> HostBatch:
        tensors, extras = self.preparing.result()
        return HostBatch(tensors, self.n, self.pool, extras=extras)


def torch_dtype(datatype: str) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=DTYPES[datatype])).dtype


class Preparer(Protocol):
    """How requests that carry text, images or records become a model's input tensors."""

    client_inputs: tuple[TensorSpec, ...]

    def prepare(self, rows: Sequence[Any]) -> tuple[list[np.ndarray], dict[str, Any]]: ...

    def example(self, seq_len: int | None) -> list[Any]: ...


def preparer_for(
    config: ModelConfig, path: Path, seq_buckets: Sequence[int], device: torch.device | None = None
) -> Any:
    """The preparer a config asks for (text, image, fields), or None."""
    if config.text is not None:
        from pipeline.models.text import TextInputs

        return TextInputs(config, path, seq_buckets)
    if config.image is not None:
        from pipeline.models.images import image_inputs

        return image_inputs(config, device or torch.device("cpu"))
    if config.fields:
        from pipeline.models.records import RecordInputs

        return RecordInputs(config)
    return None


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
        path: Path | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.name, self.version = label.split(":", 1)
        self.config = config
        self.batch_buckets = batch_buckets
        self.seq_buckets = seq_buckets
        self.pool = pool
        self.handler = config.format == "handler"
        self.preparer = preparer_for(config, path or Path("."), seq_buckets, device)
        # What clients send: every input but the attention mask, which is made here; or
        # what the preparer takes (text, an image, a record's fields).
        self.client_inputs = (
            self.preparer.client_inputs
            if self.preparer is not None
            else tuple(s for s in config.inputs if s.name != config.mask_input)
        )
        self._client_index = {s.name: i for i, s in enumerate(self.client_inputs)}
        # A handler's inputs (BYTES among them) are never stacked into tensors.
        self._dtypes = [] if self.handler else [torch_dtype(s.datatype) for s in config.inputs]
        # The usual model: one fixed-shape FP32 or FP64 input, whose flat list of numbers
        # `from_request` takes after a few comparisons.
        self._plain: tuple[str, str, tuple[tuple[int, ...], ...], int] | None = None
        [first, *more] = self.client_inputs or [None]
        if (
            first is not None
            and not more
            and self.preparer is None
            and not self.handler
            and first.variable_axis is None
            and first.datatype in _FAST_DATATYPES
        ):
            shapes = (first.shape, (1, *first.shape))
            self._plain = (first.name, first.datatype, shapes, math.prod(first.shape))

    @property
    def variable(self) -> bool:
        """Whether some input takes a variable length (padded to a sequence bucket)."""
        return any(s.variable_axis is not None for s in self.config.inputs)

    def example(self, seq_len: int | None) -> list[Any]:
        """One request's inputs for warm-up, at sequence bucket ``seq_len``."""
        if self.preparer is not None:
            return self.preparer.example(seq_len)
        return [
            np.zeros(with_length(s.shape, s.variable_axis, seq_len), dtype=DTYPES[s.datatype])
            for s in self.client_inputs
        ]

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
        plain = self._plain
        if plain is not None and flat and len(tensors) == 1:
            only = tensors[0]
            name, datatype, shapes, count = plain
            if (
                only.name == name
                and only.datatype == datatype
                and type(only.data) is list
                and tuple(only.shape) in shapes
                and _flat_numbers(only.data, count)
            ):
                return [only.data]
            # Anything else (raw bytes, nested lists, what is wrong) takes the full path.
        if self.preparer is not None and self.config.fields:
            return self.preparer.check(tensors)  # type: ignore[no-any-return]
        by_name = {t.name: t for t in tensors}
        if len(by_name) != len(tensors):
            raise RequestError(BAD_SHAPE, "inputs must have distinct names, got "
                               f"{[t.name for t in tensors]}")  # fmt: skip
        if self.preparer is not None:
            [spec] = self.client_inputs
            self._expect_only(by_name, spec.name)
            return [self.preparer.check(by_name[spec.name])]
        if self.handler:
            return [self._handler_inputs(by_name, max_elements)]
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
                and _flat_numbers(data, math.prod(shape))
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

    def _expect_only(self, by_name: dict[str, Tensor], name: str) -> None:
        if name not in by_name:
            raise RequestError(BAD_SHAPE, f"model {self.name}:{self.version} needs input "
                               f"{name!r}, got {sorted(by_name)}")  # fmt: skip
        if len(by_name) > 1:
            raise RequestError(BAD_SHAPE, f"unexpected inputs {sorted(set(by_name) - {name})} "
                               f"for model {self.name}:{self.version}")  # fmt: skip

    def _handler_inputs(self, by_name: dict[str, Tensor], max_elements: int) -> dict[str, Any]:
        """A handler's request: numbers as arrays of the input's shape, BYTES as a list of
        strings (bytes where they are not UTF-8)."""
        missing = [s.name for s in self.client_inputs if s.name not in by_name]
        extra = sorted(set(by_name) - {s.name for s in self.client_inputs})
        if missing or extra:
            raise RequestError(BAD_SHAPE, f"model {self.name}:{self.version} takes inputs "
                               f"{[s.name for s in self.client_inputs]}, got "
                               f"{sorted(by_name)}")  # fmt: skip
        values: dict[str, Any] = {}
        for spec in self.client_inputs:
            tensor = by_name[spec.name]
            if tensor.datatype != spec.datatype:
                raise RequestError(BAD_DTYPE, f"input {spec.name!r} must be {spec.datatype}, "
                                   f"got {tensor.datatype}")  # fmt: skip
            if spec.datatype == "BYTES":
                items = [tensor.data] if isinstance(tensor.data, bytes) else tensor.data
                if len(items) > max_elements or math.prod(tensor.shape) != len(items):
                    raise RequestError(BAD_SHAPE, f"input {spec.name!r}: shape "
                                       f"{tensor.shape} for {len(items)} values")  # fmt: skip
                values[spec.name] = [_text_or_bytes(v) for v in items]
                continue
            array = tensor_to_array(tensor, max_elements)
            shape = tuple(array.shape)
            if spec.variable_axis is not None:
                values[spec.name] = array.reshape(self._variable_shape(spec, shape))
            elif shape in (spec.shape, (1, *spec.shape)):
                values[spec.name] = array.reshape(spec.shape)
            else:
                raise RequestError(BAD_SHAPE, f"input {spec.name!r} must have shape "
                                   f"{list(spec.shape)}, got {list(shape)}")  # fmt: skip
        return values

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
        if self.handler:
            return HostBatch([], n, self.pool, requests=[r[0] for r in rows])
        if self.preparer is not None:
            return self._stack_prepared(rows)
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

    @property
    def forks(self) -> bool:
        """Whether `begin` returns before the batch is prepared: its images decode on
        torch's own threads (`DeviceImageInputs.begin`, ``image.decode: nvjpeg-forked``)."""
        return getattr(self.preparer, "decoder", None) == "nvjpeg-forked"

    def begin(self, rows: Sequence[Sequence[Any]]) -> Stacking:
        """`stack` in two steps, for a preparer on the device: the batch starts preparing
        and `Stacking.result` finishes it (at once, unless `forks`)."""
        bucket = bucket_for(len(rows), self.batch_buckets)
        preparing = self.preparer.begin([r[0] for r in rows], bucket)  # type: ignore[union-attr]
        return Stacking(preparing, len(rows), self.pool)

    def _stack_prepared(self, rows: Sequence[Sequence[Any]]) -> HostBatch:
        """A batch the preparer makes (tokenized, decoded), copied into pooled buffers
        padded to the batch bucket; or, prepared on the device, its tensors as they are."""
        n = len(rows)
        values = rows if self.config.fields else [r[0] for r in rows]
        bucket = bucket_for(n, self.batch_buckets)
        if getattr(self.preparer, "on_device", False):
            tensors, extras = self.preparer.prepare(values, bucket)
            return HostBatch(tensors, n, self.pool, extras=extras)
        arrays, extras = self.preparer.prepare(values)
        batch = HostBatch([], n, self.pool, extras=extras)
        try:
            for array, dtype in zip(arrays, self._dtypes, strict=True):
                buf = self.pool.take((bucket, *array.shape[1:]), dtype)
                batch.tensors.append(buf)
                view = buf.numpy()
                view[:n] = array
                view[n:] = 0
            batch.arrays = [t.numpy()[:n] for t in batch.tensors]
        except BaseException:
            batch.release()
            raise
        return batch


def _text_or_bytes(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value if isinstance(value, str) else str(value)


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
    elif dtype.kind == "f" and all(type(c) is list for c in column):
        # The requests' flat lists of numbers (checked at admission) as one list into
        # float64, then cast: numpy converts a flat list of Python floats into doubles in
        # half the time it takes a list of lists into float32 (each number is a double
        # first either way, so the values are the same).
        flat: list[Any] = []
        for c in column:
            flat += c
        with np.errstate(over="ignore"):
            dst[...] = np.array(flat, dtype=np.float64).reshape(n, -1)
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


def _flat_numbers(data: list[Any], count: int) -> bool:
    """A flat list of exactly ``count`` numbers (ints, floats, bools; JSON has no NaN or
    infinity) that a float holds: a string, a null or a nested list fails the sum, an int
    too large for a float fails its conversion. Anything else takes the checked path
    (`tensor_to_array`), which gives the reason."""
    if len(data) != count:
        return False
    try:
        float(sum(data))  # one pass in C
    except (TypeError, OverflowError):
        return False
    return True
