"""Tabular records: named fields, one ``[1]``-shaped tensor each, in any numeric (or
BOOL) datatype, mapped to the model's feature vector in the order its config declares
(``"fields": [...]``). A missing or unexpected field, or one that is not a number, is
refused with ``bad_field`` and the field's name."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.models.config import ModelConfig, TensorSpec
from pipeline.protocol.codec import BAD_FIELD, DTYPES, RequestError, Tensor


class RecordInputs:
    """A record model's request check and feature-vector batches."""

    def __init__(self, config: ModelConfig) -> None:
        self.fields = config.fields
        self.client_inputs = tuple(TensorSpec(f, "FP64", (1,)) for f in config.fields)
        self.dtype = np.dtype(DTYPES[config.inputs[0].datatype])

    def check(self, tensors: Sequence[Tensor]) -> list[float]:
        """The record's values in the model's field order, or `RequestError` naming the
        field that is wrong."""
        by_name = {t.name: t for t in tensors}
        extra = sorted(set(by_name) - set(self.fields))
        if extra or len(by_name) != len(tensors):
            names = extra or [t.name for t in tensors]
            raise RequestError(BAD_FIELD, f"unexpected fields {names}; the model takes "
                               f"{list(self.fields)}")  # fmt: skip
        values = []
        for name in self.fields:
            tensor = by_name.get(name)
            if tensor is None:
                raise RequestError(BAD_FIELD, f"missing field {name!r}")
            values.append(_value(tensor))
        return values

    def prepare(self, rows: Sequence[Sequence[float]]) -> tuple[list[np.ndarray], dict[str, Any]]:
        with np.errstate(over="ignore"):
            array = np.array(rows, dtype=self.dtype)
        if self.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
            column = self.fields[int(np.flatnonzero(~np.isfinite(array[bad]))[0])]
            message = f"field {column!r} is out of range for {self.dtype.name}"
            if len(rows) == 1:
                raise RequestError(BAD_FIELD, message)
            raise ValueError(message)
        return [array], {}

    def example(self, _seq_len: int | None) -> list[Any]:
        return [0.0] * len(self.fields)


def _value(tensor: Tensor) -> float:
    name = tensor.name
    if tensor.datatype == "BYTES" or tensor.datatype not in DTYPES:
        raise RequestError(BAD_FIELD, f"field {name!r} must be a number, got {tensor.datatype}")
    if math.prod(tensor.shape) != 1 or len(tensor.shape) > 1:
        raise RequestError(BAD_FIELD, f"field {name!r} holds one value: shape [1], got "
                           f"{list(tensor.shape)}")  # fmt: skip
    data = tensor.data
    if isinstance(data, bytes):
        dtype = np.dtype(DTYPES[tensor.datatype]).newbyteorder("<")
        if len(data) != dtype.itemsize:
            raise RequestError(BAD_FIELD, f"field {name!r}: {len(data)} bytes for one "
                               f"{tensor.datatype}")  # fmt: skip
        return float(np.frombuffer(data, dtype=dtype)[0])
    value = data[0] if len(data) == 1 else None
    if type(value) not in (int, float, bool):
        raise RequestError(BAD_FIELD, f"field {name!r} must be a number, got {value!r:.40}")
    return float(value)  # type: ignore[arg-type]
