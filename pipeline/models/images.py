"""Image inputs: JPEG or PNG bytes in a ``BYTES`` tensor, decoded and resized on the worker.

A request carries one encoded image: raw bytes in MessagePack, a base64 string in JSON
(``{"name": "image", "datatype": "BYTES", "shape": [1], "data": "<base64>"}``). Admission
reads only its header (format and size: a decompression bomb is refused there); the batch
decodes its images on a few threads (Pillow releases the GIL while it decodes), resizes them
as the config says and normalises them into the model's input. This is the CPU path.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.models.config import ImageOptions, ModelConfig, TensorSpec
from pipeline.protocol.codec import BAD_DTYPE, BAD_IMAGE, BAD_SHAPE, DTYPES, RequestError, Tensor

_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}


class ImageInputs:
    """An image model's request check and batch decoding."""

    def __init__(self, config: ModelConfig, threads: int = 4) -> None:
        assert config.image is not None
        self.options: ImageOptions = config.image
        self.client_inputs = (TensorSpec(self.options.input, "BYTES", (1,)),)
        self.dtype = np.dtype(DTYPES[config.inputs[0].datatype])
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="sluice-decode")
        scale = np.float32(255.0)
        self._mean = (np.array(self.options.mean, np.float32) * scale).reshape(1, 1, 3)
        self._inv_std = (1.0 / (np.array(self.options.std, np.float32) * scale)).reshape(1, 1, 3)

    def check(self, tensor: Tensor) -> bytes:
        """The request's encoded image, its header read; `RequestError` if it is not a JPEG
        or PNG image of at most ``max_pixels``."""
        from PIL import Image, UnidentifiedImageError

        name = tensor.name
        if tensor.datatype != "BYTES":
            raise RequestError(BAD_DTYPE, f"input {name!r} must be BYTES (a JPEG or PNG "
                               f"image), got {tensor.datatype}")  # fmt: skip
        if list(tensor.shape) != [1]:
            raise RequestError(BAD_SHAPE, f"input {name!r} holds one image: shape [1], got "
                               f"{list(tensor.shape)}")  # fmt: skip
        data: Any = tensor.data
        if isinstance(data, list):
            data = data[0] if len(data) == 1 else None
        if isinstance(data, str):
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError(BAD_IMAGE, f"input {name!r} is not base64") from None
        if not isinstance(data, bytes):
            raise RequestError(BAD_SHAPE, f"input {name!r} must hold the image's bytes")
        if not any(data.startswith(m) for m in _MAGIC):
            raise RequestError(BAD_IMAGE, f"input {name!r} is not a JPEG or PNG image")
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise RequestError(BAD_IMAGE, f"input {name!r} cannot be read: {exc}") from None
        if width * height > self.options.max_pixels:
            raise RequestError(BAD_IMAGE, f"input {name!r} is {width}x{height}, over "
                               f"{self.options.max_pixels} pixels")  # fmt: skip
        return data

    def prepare(self, rows: Sequence[bytes]) -> tuple[list[np.ndarray], dict[str, Any]]:
        """The batch's images decoded, resized and normalised into one array."""
        out = np.empty((len(rows), *self.options.shape), dtype=self.dtype)
        errors = list(self._pool.map(self._decode_into, rows, range(len(rows)), [out] * len(rows)))
        bad = [e for e in errors if e is not None]
        if bad:
            if len(rows) == 1:
                raise RequestError(BAD_IMAGE, f"the image cannot be decoded: {bad[0]}")
            raise ValueError(f"{len(bad)} images in the batch cannot be decoded")
        return [out], {}

    def _decode_into(self, data: bytes, i: int, out: np.ndarray) -> str | None:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:
                pixels = self._resize(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as exc:
            return str(exc) or type(exc).__name__
        hwc = np.asarray(pixels, dtype=np.uint8)
        if self.dtype.kind == "f":
            value: np.ndarray = (hwc.astype(np.float32) - self._mean) * self._inv_std
        else:
            value = hwc
        out[i] = value.transpose(2, 0, 1) if self.options.layout == "CHW" else value
        return None

    def _resize(self, image: Any) -> Any:
        from PIL import Image

        h, w = self.options.size
        if self.options.resize == "stretch":
            return image.resize((w, h), Image.Resampling.BILINEAR)
        scale = max(w / image.width, h / image.height)
        size = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
        left, top = (size[0] - w) // 2, (size[1] - h) // 2
        return image.crop((left, top, left + w, top + h))

    def example(self, _seq_len: int | None) -> list[Any]:
        """A request row holding a small PNG (for warm-up)."""
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (128, 64, 32)).save(buf, format="PNG")
        return [buf.getvalue()]

    def close(self) -> None:
        self._pool.shutdown(wait=False)
