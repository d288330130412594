"""Image inputs: JPEG or PNG bytes in a ``BYTES`` tensor, decoded and resized on the worker.

A request carries one encoded image: raw bytes in MessagePack, a base64 string in JSON
(``{"name": "image", "datatype": "BYTES", "shape": [1], "data": "<base64>"}``). Admission
reads only its header (format and size: a decompression bomb is refused there); the batch
decodes its images on a few threads (Pillow releases the GIL while it decodes), resizes them
as the config says and normalises them into the model's input. This is the CPU path
(`ImageInputs`).

On CUDA (``image.decode``: `image_inputs` picks) `DeviceImageInputs` decodes a batch's JPEGs on
the GPU: through torchvision's nvJPEG batch decoder, or through nvImageCodec (both drive the
GPU's hardware JPEG engines where it has them, A100 and H100, the SMs elsewhere); a PNG, or a
JPEG the GPU decoder refuses (CMYK, say), is decoded by Pillow and copied up. Resizing (one call
per distinct image size) and normalisation run there too, into the batch's device tensor, padded
to its bucket: nothing goes back through host memory.

An image that cannot be decoded is answered ``bad_image`` alone: its row is zeros in the
batch, and the batch's ``errors`` extra names it, so its neighbours are computed as usual.
"""

from __future__ import annotations

import base64
import binascii
import collections
import importlib.util
import io
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from pipeline.models.config import ImageOptions, ModelConfig, TensorSpec
from pipeline.protocol.codec import BAD_DTYPE, BAD_IMAGE, BAD_SHAPE, DTYPES, RequestError, Tensor

log = logging.getLogger(__name__)

_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"
# JPEG markers that start a frame (SOF0-SOF15 but DHT, JPG and DAC): its header holds the size.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length (TEM, RST0-7), and those after which no frame header may come.
_BARE = frozenset({0x01, *range(0xD0, 0xD8)})
_SCAN_OR_END = frozenset({0xDA, 0xD9})
# What each GPU decoder needs installed (``auto`` tries them in this order).
_GPU_DECODERS = {
    "nvjpeg": "torchvision",
    "nvimgcodec": "nvidia.nvimgcodec",
    "nvjpeg-forked": "torchvision",
}


def image_inputs(config: ModelConfig, device: torch.device) -> ImageInputs:
    """The image preparer for ``config`` on ``device``: the GPU path that ``image.decode``
    asks for (or, ``auto``, the first this machine has), else the CPU path."""
    assert config.image is not None
    decode = config.image.decode
    if decode == "cpu":
        return ImageInputs(config)
    if device.type != "cuda":
        if decode != "auto":
            log.warning("image.decode %s needs CUDA; decoding on the CPU", decode)
        return ImageInputs(config)
    have = [name for name, module in _GPU_DECODERS.items() if _installed(module)]
    if decode == "auto":
        return DeviceImageInputs(config, device, have[0]) if have else ImageInputs(config)
    if decode not in have:
        log.warning("image.decode %s needs %s, not installed; decoding on the CPU", decode,
                    _GPU_DECODERS[decode])  # fmt: skip
        return ImageInputs(config)
    return DeviceImageInputs(config, device, decode)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


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
        or PNG image of at most ``max_pixels``. (Reading the size from the header here takes
        a microsecond or two, a twentieth of what opening it with Pillow takes.)"""
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
        if data.startswith(_JPEG):
            size = _jpeg_size(data)
        elif data.startswith(_PNG):
            size = _png_size(data)
        else:
            raise RequestError(BAD_IMAGE, f"input {name!r} is not a JPEG or PNG image")
        if size is None:
            raise RequestError(BAD_IMAGE, f"input {name!r} cannot be read: no image size in "
                               "its header")  # fmt: skip
        width, height = size
        if width * height > self.options.max_pixels:
            raise RequestError(BAD_IMAGE, f"input {name!r} is {width}x{height}, over "
                               f"{self.options.max_pixels} pixels")  # fmt: skip
        return data

    def prepare(self, rows: Sequence[bytes]) -> tuple[list[np.ndarray], dict[str, Any]]:
        """The batch's images decoded, resized and normalised into one array; a row that
        cannot be decoded is zeros, and named in the ``errors`` extra."""
        out = np.empty((len(rows), *self.options.shape), dtype=self.dtype)
        errors = list(self._pool.map(self._decode_into, rows, range(len(rows)), [out] * len(rows)))
        return [out], _errors_extra(errors)

    def _decode_into(self, data: bytes, i: int, out: np.ndarray) -> str | None:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:
                pixels = self._resize(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as exc:
            out[i] = 0
            return _undecodable(exc)
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
        """A request row holding a JPEG of the model's size (for warm-up)."""
        from PIL import Image

        h, w = self.options.size
        ramp = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None]
        pixels = np.broadcast_to(ramp, (h, w, 3)).copy()
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=90)
        return [buf.getvalue()]

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class DeviceImageInputs(ImageInputs):
    """Image batches decoded, resized and normalised on the GPU (see the module docstring).

    ``decoder`` is ``nvjpeg``, ``nvjpeg-forked`` (`begin`), ``nvimgcodec`` or ``pil``
    (Pillow on the worker's threads, the rest on ``device`` as for the others: how the CPU
    test suite exercises this path).
    ``prepare`` returns the batch as one tensor on ``device``, in ``out_dtype`` (the model's
    input datatype, or the half precision it computes in: `LoadedModel` sets it).
    """

    on_device = True

    def __init__(
        self, config: ModelConfig, device: torch.device, decoder: str, threads: int = 4
    ) -> None:
        super().__init__(config, threads)
        if decoder not in ("nvjpeg", "nvjpeg-forked", "nvimgcodec", "pil"):
            raise ValueError(
                f"decoder must be nvjpeg, nvjpeg-forked, nvimgcodec or pil, got {decoder!r}"
            )
        self.device = device
        self.decoder = decoder
        if decoder == "nvjpeg-forked":
            try:
                _forked_decoder()
            except Exception as exc:  # noqa: BLE001 - e.g. a torchvision without the op
                log.warning("image.decode nvjpeg-forked unavailable (%s); using nvjpeg", exc)
                self.decoder = "nvjpeg"
        self.out_dtype = torch.from_numpy(np.empty(0, self.dtype)).dtype
        opts = self.options
        self._mean_t = torch.tensor(opts.mean, device=device).view(1, 3, 1, 1) * 255.0
        self._inv_std_t = 1.0 / (torch.tensor(opts.std, device=device).view(1, 3, 1, 1) * 255.0)
        self._codec: Any = None
        # nvImageCodec's images stay alive until the batch that copied them has run.
        self._held: collections.deque[tuple[Any, list[Any]]] = collections.deque()
        if decoder == "nvimgcodec":
            from nvidia import nvimgcodec

            # The hardware engines first; the SMs for what they cannot take (progressive
            # JPEGs, say).
            kinds = (nvimgcodec.BackendKind.HW_GPU_ONLY, nvimgcodec.BackendKind.GPU_ONLY)
            self._codec = nvimgcodec.Decoder(
                device_id=device.index or 0, backends=[nvimgcodec.Backend(k) for k in kinds]
            )

    def prepare(  # type: ignore[override]
        self, rows: Sequence[bytes], bucket: int | None = None
    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """The batch's images as one ``(bucket, *shape)`` tensor on the device (rows past
        ``len(rows)``, and rows that cannot be decoded, are zeros)."""
        return self.begin(rows, bucket).result()

    def begin(self, rows: Sequence[bytes], bucket: int | None = None) -> Preparing:
        """`prepare` in two steps (``nvjpeg-forked``): torchvision's nvJPEG decoder starts
        on one of torch's own threads, which never take the interpreter, and this returns at
        once; `result` (on the caller's thread) resizes, normalises and pads the batch once
        it is decoded. With the other decoders the whole batch is decoded here."""
        if self.decoder != "nvjpeg-forked":
            images, errors = self._decode(rows)
            return Preparing(self, len(rows), bucket, images, errors)
        jpegs = [i for i, d in enumerate(rows) if d[:3] == _JPEG]
        parts = _parts([rows[i] for i in jpegs])
        future = _forked_decoder().start(parts, _RGB, self.device) if parts else None
        return Preparing(
            self, len(rows), bucket, rows=rows, jpegs=jpegs, parts=parts, future=future
        )

    def _assemble(
        self, n: int, bucket: int | None, images: list[Any], errors: list[str | None]
    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        h, w = self.options.size
        fmt = torch.channels_last if self.options.channels_last else torch.contiguous_format
        out = torch.empty(
            (bucket or n, 3, h, w), dtype=self.out_dtype, device=self.device, memory_format=fmt
        )
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            if image is not None:
                groups.setdefault((image.shape[1], image.shape[2]), []).append(i)
        for rows_of_size in groups.values():
            value = self._pixels(torch.stack([images[i] for i in rows_of_size]))
            first, k = rows_of_size[0], len(rows_of_size)
            if rows_of_size[-1] - first == k - 1:  # consecutive rows: a slice
                out[first : first + k] = value
            else:
                out[torch.tensor(rows_of_size, device=self.device)] = value
        for i, error in enumerate(errors):
            if error is not None:
                out[i] = 0
        out[n:] = 0
        self._hold(images)
        if self.options.layout == "HWC":
            out = out.permute(0, 2, 3, 1).contiguous()
        return [out], _errors_extra(errors)

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Same-sized ``(k, 3, h, w)`` uint8 images resized and normalised as configured."""
        h, w = self.options.size
        ih, iw = x.shape[2], x.shape[3]
        floats = x.float()
        if (ih, iw) != (h, w):
            if self.options.resize == "stretch":
                floats = _interpolate(floats, (h, w))
            else:  # center_crop: the shorter side to the target, the middle kept
                scale = max(w / iw, h / ih)
                size = (max(h, round(ih * scale)), max(w, round(iw * scale)))
                floats = _interpolate(floats, size)
                top, left = (size[0] - h) // 2, (size[1] - w) // 2
                floats = floats[:, :, top : top + h, left : left + w]
        if self.out_dtype.is_floating_point:
            return (floats - self._mean_t) * self._inv_std_t
        return floats.round_().clamp_(0, 255)

    def _decode(self, rows: Sequence[bytes]) -> tuple[list[Any], list[str | None]]:
        """Each row as a ``(3, h, w)`` uint8 tensor on the device, or None and its error."""
        on_gpu = [i for i, d in enumerate(rows) if d[:3] == _JPEG] if self._on_gpu else []
        return self._decode_rest(rows, on_gpu, self._gpu_decode([rows[i] for i in on_gpu]))

    def _decode_rest(
        self, rows: Sequence[bytes], on_gpu: list[int], decoded: list[Any]
    ) -> tuple[list[Any], list[str | None]]:
        """The rows the GPU decoded (``decoded``, None where it refused one) and the rest
        decoded by Pillow and copied up."""
        n = len(rows)
        images: list[Any] = [None] * n
        errors: list[str | None] = [None] * n
        for i, image in zip(on_gpu, decoded, strict=True):
            images[i] = image
        rest = [i for i in range(n) if images[i] is None]
        for i, got in zip(rest, self._pool.map(_pil_rgb, [rows[i] for i in rest]), strict=True):
            if isinstance(got, str):
                errors[i] = got
            else:
                images[i] = torch.from_numpy(got).to(self.device).permute(2, 0, 1)
        return images, errors

    @property
    def _on_gpu(self) -> bool:
        return self.decoder != "pil"

    def _gpu_decode(self, datas: list[bytes]) -> list[Any]:
        """JPEGs decoded on the GPU, None for each it refuses (Pillow tries those)."""
        if not datas:
            return []
        if self.decoder == "nvimgcodec":
            stream = torch.cuda.current_stream(self.device).cuda_stream
            decoded = self._codec.decode(datas, cuda_stream=stream)
            return [
                None if d is None else torch.as_tensor(d, device=self.device).permute(2, 0, 1)
                for d in decoded
            ]
        from torchvision.io import ImageReadMode, decode_jpeg

        parts = _parts(datas)
        try:
            return list(decode_jpeg(parts, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad image fails the call: find it
            return self._one_by_one(parts)

    def _one_by_one(self, parts: list[torch.Tensor]) -> list[Any]:
        """Each JPEG decoded alone, None for those the GPU refuses (one bad image in a list
        fails the whole list)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        out: list[Any] = []
        for part in parts:
            try:
                out.append(decode_jpeg(part, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                out.append(None)
        return out

    def _hold(self, images: list[Any]) -> None:
        """Keep nvImageCodec's images (its memory) until the copies from them have run."""
        if self.decoder != "nvimgcodec":
            return
        while self._held and self._held[0][0].query():
            self._held.popleft()
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._held.append((event, images))


class Preparing:
    """A batch `DeviceImageInputs.begin` started: `done` says whether `result` would wait
    for the decoder."""

    def __init__(
        self,
        inputs: DeviceImageInputs,
        n: int,
        bucket: int | None,
        images: list[Any] | None = None,
        errors: list[str | None] | None = None,
        rows: Sequence[bytes] = (),
        jpegs: list[int] | None = None,
        parts: list[torch.Tensor] | None = None,
        future: Any = None,
    ) -> None:
        self._inputs = inputs
        self._n, self._bucket = n, bucket
        self._decoded = (images, errors) if images is not None and errors is not None else None
        self._rows, self._jpegs, self._parts, self._future = rows, jpegs or [], parts, future

    def done(self) -> bool:
        return self._future is None or bool(self._future.done())

    def result(self) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """The batch's tensors and extras (`DeviceImageInputs.prepare`)."""
        inputs = self._inputs
        if self._decoded is not None:
            images, errors = self._decoded
        else:
            decoded: list[Any] = []
            if self._future is not None:
                try:
                    decoded = list(self._future.wait())
                except RuntimeError:  # one bad image fails the list: find it
                    decoded = inputs._one_by_one(self._parts or [])
            images, errors = inputs._decode_rest(self._rows, self._jpegs, decoded)
        return inputs._assemble(self._n, self._bucket, images, errors)


# RGB in torchvision's ImageReadMode.
_RGB = 3
_FORKED_SOURCE = """
def decode(datas: List[Tensor], mode: int, device: Device) -> List[Tensor]:
    return torch.ops.image.decode_jpegs_cuda(datas, mode, device)

def start(datas: List[Tensor], mode: int, device: Device) -> Future[List[Tensor]]:
    return torch.jit.fork(decode, datas, mode, device)
"""
_forked: Any = None


def _forked_decoder() -> Any:
    """torchvision's batched nvJPEG call forked from TorchScript: the fork runs on torch's
    inter-op threads without the GIL (a fork from Python would run at once, on the caller).
    The op holds no Python object, so the loop thread runs Python meanwhile."""
    global _forked
    if _forked is None:
        import torchvision.io  # noqa: F401 - registers torch.ops.image

        _forked = torch.jit.CompilationUnit(_FORKED_SOURCE)
    return _forked


def _parts(datas: list[bytes]) -> list[torch.Tensor]:
    """Encoded images as uint8 tensors over one buffer (what torchvision's decoder takes)."""
    if not datas:
        return []
    blob = torch.frombuffer(bytearray(b"".join(datas)), dtype=torch.uint8)
    return list(torch.split(blob, [len(d) for d in datas]))


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, or None if the markers before it do not
    hold together."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _BARE:
            i += 2
            continue
        if marker in _SCAN_OR_END:
            return None
        if marker in _SOF:
            if i + 9 > n:
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return (width, height) if width and height else None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk (always the first), or None."""
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return (width, height) if width and height else None


def _interpolate(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased when shrinking (as Pillow's resize is)."""
    shrink = size[0] < x.shape[2] or size[1] < x.shape[3]
    return torch.nn.functional.interpolate(
        x, size=size, mode="bilinear", align_corners=False, antialias=shrink
    )


def _pil_rgb(data: bytes) -> np.ndarray | str:
    """An image's ``(h, w, 3)`` RGB pixels by Pillow, or why it cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.array(image.convert("RGB"), dtype=np.uint8)  # writable: torch takes it
    except (OSError, ValueError, SyntaxError) as exc:
        return _undecodable(exc)


def _undecodable(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _errors_extra(errors: list[str | None]) -> dict[str, Any]:
    """The ``errors`` extra (one entry per row, None where it decoded), or none at all."""
    if all(e is None for e in errors):
        return {}
    return {"errors": [e and f"the image cannot be decoded: {e}" for e in errors]}
