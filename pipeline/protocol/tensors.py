"""Tensors in the Open Inference Protocol (v2) shape, to and from numpy arrays, checked
against their datatype, shape and an element limit."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import msgspec
import numpy as np

from pipeline.protocol.reasons import BAD_DTYPE, BAD_SHAPE, OVERSIZE, RequestError

DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
# Keyed by the numpy dtype itself, in either byte order: `dtype.name` builds its string on
# every call (3 µs here).
DATATYPE_OF: dict[np.dtype[Any], Any] = {
    np.dtype(v).newbyteorder(order): k for k, v in DTYPES.items() if k != "BYTES" for order in "<>="
}


Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]  # fmt: skip


class Tensor(msgspec.Struct, omit_defaults=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    datatype: Datatype
    shape: Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=8)]
    # A list of numbers (flat or nested, row-major), or raw little-endian bytes: MessagePack
    # `bin`, or a base64 string in JSON.
    data: list[Any] | bytes
    parameters: dict[str, Any] | None = None


def tensor_to_array(tensor: Tensor, max_elements: int) -> np.ndarray:
    """Turn a request tensor into a numpy array of its datatype and shape."""
    dtype = DTYPES.get(tensor.datatype)
    if dtype is None or tensor.datatype == "BYTES":
        raise RequestError(
            BAD_DTYPE, f"input {tensor.name!r}: unsupported datatype {tensor.datatype!r}"
        )
    expected = math.prod(tensor.shape)  # exact: np.prod wraps around in int64
    if expected > max_elements:
        raise RequestError(
            OVERSIZE, f"input {tensor.name!r} has {expected} elements, limit is {max_elements}"
        )
    if isinstance(tensor.data, bytes):
        return _bytes_to_array(tensor, np.dtype(dtype), expected)
    try:
        array = np.asarray(tensor.data)
    except (ValueError, TypeError) as exc:
        raise RequestError(BAD_SHAPE, f"input {tensor.name!r}: ragged data ({exc})") from None
    if array.dtype == np.object_ or (array.size and array.dtype.kind not in "biuf"):
        raise RequestError(
            BAD_DTYPE, f"input {tensor.name!r}: data must be numbers for {tensor.datatype}"
        )
    want = np.dtype(dtype)
    if want.kind in "iu" and array.size and array.dtype.kind == "f":
        # numpy turns ints beyond int64 (valid UINT64) into floats; keep them exact.
        if want == np.uint64 and all(type(v) is int for v in tensor.data):
            array = np.array(tensor.data, dtype=object)
        else:
            raise RequestError(
                BAD_DTYPE, f"input {tensor.name!r}: {tensor.datatype} data holds non-integers"
            )
    if want.kind in "iu" and array.size:
        # astype wraps integers silently (256 -> 0 in UINT8): check the range first.
        info = np.iinfo(want)
        if int(array.min()) < info.min or int(array.max()) > info.max:
            raise RequestError(
                BAD_DTYPE, f"input {tensor.name!r}: data out of range for {tensor.datatype}"
            )
    if array.size != expected:
        raise RequestError(
            BAD_SHAPE,
            f"input {tensor.name!r}: shape {tensor.shape} needs {expected} elements, "
            f"data has {array.size}",
        )
    with np.errstate(over="raise", invalid="raise"):
        try:
            return array.astype(want, copy=False).reshape(tensor.shape)
        except (FloatingPointError, OverflowError, ValueError) as exc:
            raise RequestError(
                BAD_DTYPE, f"input {tensor.name!r}: data out of range for {tensor.datatype}"
            ) from exc


def _bytes_to_array(tensor: Tensor, dtype: np.dtype, expected: int) -> np.ndarray:
    assert isinstance(tensor.data, bytes)
    if len(tensor.data) != expected * dtype.itemsize:
        raise RequestError(
            BAD_SHAPE,
            f"input {tensor.name!r}: shape {tensor.shape} of {tensor.datatype} needs "
            f"{expected * dtype.itemsize} bytes, data has {len(tensor.data)}",
        )
    array = np.frombuffer(tensor.data, dtype=dtype.newbyteorder("<")).reshape(tensor.shape)
    if dtype.kind == "f" and not np.isfinite(array).all():
        raise RequestError(BAD_DTYPE, f"input {tensor.name!r}: data holds NaN or infinity")
    return array


def array_to_tensor(name: str, array: np.ndarray, raw: bool = False) -> Tensor:
    """A response tensor; ``raw`` puts numeric data as little-endian bytes (MessagePack)."""
    if raw and array.dtype != np.object_:
        raw_bytes = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        return Tensor(name, DATATYPE_OF[array.dtype], list(array.shape), raw_bytes)
    if array.dtype == np.object_:
        data = [v.decode() if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
        return Tensor(name=name, datatype="BYTES", shape=list(array.shape), data=data)
    return Tensor(
        name=name,
        datatype=DATATYPE_OF[array.dtype],
        shape=list(array.shape),
        data=array.reshape(-1).tolist(),
    )


def tensor_values(tensor: Tensor) -> np.ndarray:
    """A decoded tensor's data as a numpy array of its datatype and shape."""
    if isinstance(tensor.data, bytes):
        dtype = np.dtype(DTYPES[tensor.datatype]).newbyteorder("<")
        return np.frombuffer(tensor.data, dtype=dtype).reshape(tensor.shape)
    return np.asarray(tensor.data, dtype=DTYPES[tensor.datatype]).reshape(tensor.shape)
