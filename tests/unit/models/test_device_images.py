"""The GPU image path (`DeviceImageInputs`): its resizing, normalisation, layouts, padding and
per-row errors, run here on the CPU with Pillow as its decoder and checked against the CPU
path (`ImageInputs`); which path a config and a machine get; a batch with an image that does
not decode answers that one request ``bad_image`` and the rest as usual."""

from __future__ import annotations

import io
import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.config import Settings
from pipeline.models import ModelConfig, ModelRegistry, TensorSpec, save_model
from pipeline.models.config import ImageOptions
from pipeline.models.images import DeviceImageInputs, ImageInputs, image_inputs
from pipeline.observability.metrics import Metrics
from pipeline.protocol import codec
from pipeline.protocol.codec import RequestError
from pipeline.serving import Origin, Pipeline, now_ms

CPU = torch.device("cpu")
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
TORCHSCRIPT_DEPRECATED = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning"
)


def config(size: tuple[int, int] = (8, 8), datatype: str = "FP32", **image: object) -> ModelConfig:
    options = ImageOptions(size=size, mean=MEAN, std=STD, **image)  # type: ignore[arg-type]
    return ModelConfig(
        format="torchscript",
        inputs=(TensorSpec("pixels", datatype, options.shape),),
        outputs=(TensorSpec("means", "FP32", (3,)),),
        image=options,
    )


def encoded(fmt: str, size: tuple[int, int], seed: int = 0) -> bytes:
    """A smooth image (a gradient with a little noise), as a camera's would be."""
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 1, w)[None, :, None] * np.linspace(0.5, 1, h)[:, None, None]
    colour = rng.integers(60, 255, 3)[None, None, :]
    pixels = ramp * colour + rng.normal(0, 4, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(buf, format=fmt)
    return buf.getvalue()


def cut_jpeg(seed: int) -> bytes:
    """A JPEG cut in its scan data: its header reads, its pixels do not decode."""
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def both(cfg: ModelConfig, rows: list[bytes], bucket: int | None = None):  # type: ignore[no-untyped-def]
    """The device path's batch and the CPU path's, for the same rows."""
    [device], device_extras = DeviceImageInputs(cfg, CPU, "pil").prepare(rows, bucket)
    [host], host_extras = ImageInputs(cfg).prepare(rows)
    return device.numpy(), device_extras, host, host_extras


def test_same_sized_images_match_the_cpu_path_exactly() -> None:
    rows = [encoded("JPEG", (8, 8), seed=i) for i in range(3)] + [encoded("PNG", (8, 8), 9)]
    device, extras, host, _ = both(config(), rows)
    assert device.shape == (4, 3, 8, 8) and device.dtype == np.float32 and extras == {}
    np.testing.assert_allclose(device, host, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("resize", ["stretch", "center_crop"])
def test_resized_images_are_close_to_pillows(resize: str) -> None:
    # Shrunk (antialiased, as Pillow does), grown, and of two aspect ratios; two share a
    # size (resized in one call).
    sizes = [(32, 24), (5, 7), (32, 24), (16, 40)]
    rows = [encoded("JPEG" if i % 2 else "PNG", s, seed=i) for i, s in enumerate(sizes)]
    device, _, host, _ = both(config(resize=resize), rows)
    # Bilinear kernels differ a little between torch and Pillow (and Pillow rounds to
    # 8 bits before normalising): a few levels of 255 at most, after dividing by std.
    levels = np.abs(device - host) * np.array(STD).reshape(1, 3, 1, 1) * 255
    assert float(levels.mean()) < 1.5
    assert float(levels.max()) < 12


def test_uint8_hwc_and_channels_last() -> None:
    rows = [encoded("JPEG", (8, 8), seed=1), encoded("PNG", (12, 8), seed=2)]
    device, _, host, _ = both(config(datatype="UINT8", layout="HWC"), rows)
    assert device.shape == (2, 8, 8, 3) and device.dtype == np.uint8
    # The same size: the same pixels (to within a level: roundings may differ).
    np.testing.assert_allclose(device[0], host[0], rtol=1e-4, atol=1)
    assert int(np.abs(device[1].astype(int) - host[1]).max()) <= 12
    [out], _ = DeviceImageInputs(config(channels_last=True), CPU, "pil").prepare(rows, 4)
    assert out.shape == (4, 3, 8, 8)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_bad_rows_and_padding_are_zeros_and_named() -> None:
    good = encoded("JPEG", (8, 8), seed=3)
    cut = cut_jpeg(4)
    device, extras, host, host_extras = both(config(), [good, cut, b"\x89PNG\r\n\x1a\n", good], 8)
    assert device.shape == (8, 3, 8, 8)
    for errors in (extras["errors"], host_extras["errors"]):
        assert [e is None for e in errors] == [True, False, False, True]
        assert all(e.startswith("the image cannot be decoded") for e in errors[1:3])
    np.testing.assert_allclose(device[1:3], 0, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(device[4:], 0, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(device[[0, 3]], host[[0, 3]], rtol=1e-5, atol=1e-5)


def test_which_path_a_config_gets_here(caplog: pytest.LogCaptureFixture) -> None:
    assert type(image_inputs(config(), CPU)) is ImageInputs
    assert type(image_inputs(config(decode="cpu"), CPU)) is ImageInputs
    with caplog.at_level(logging.WARNING):
        for decode in ("nvjpeg", "nvjpeg-forked"):
            assert type(image_inputs(config(decode=decode), CPU)) is ImageInputs
    assert caplog.text.count("needs CUDA") == 2
    with pytest.raises(ValueError, match="image.decode"):
        config(decode="gpu")
    with pytest.raises(ValueError, match="channels_last"):
        config(layout="HWC", channels_last=True)
    with pytest.raises(ValueError, match="decoder"):
        DeviceImageInputs(config(), CPU, "libjpeg")


def test_compile_takes_a_mode() -> None:
    cfg = config()
    assert ModelConfig.from_json({**cfg.to_json(), "compile": "max-autotune"}).compile == (
        "max-autotune"
    )
    assert ModelConfig.from_json({**cfg.to_json(), "compile": True}).compile is True
    with pytest.raises(ValueError, match="compile must be"):
        ModelConfig.from_json({**cfg.to_json(), "compile": "fastest"})


class MeanPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    cfg = ModelConfig.from_json({**config().to_json(), "batch_buckets": [4, 8]})
    save_model(tmp_path, "img", "1", MeanPool(), cfg)
    return tmp_path


def _device_path(registry: ModelRegistry) -> None:
    """The registry's image model on the device path (Pillow decodes: no GPU here)."""
    model = registry.resolve("img")
    model.inputs.preparer = DeviceImageInputs(model.config, CPU, "pil")


@TORCHSCRIPT_DEPRECATED
def test_a_loaded_model_runs_device_prepared_batches(image_dir: Path) -> None:
    registry = ModelRegistry(image_dir, device=CPU)
    model = registry.resolve("img")
    rows = [[encoded("JPEG", (8 + i, 8), seed=i)] for i in range(3)]
    want = model.run([[r[0] for r in rows]])[0]
    _device_path(registry)
    batch = model.stack_inputs(rows)
    assert batch.tensors[0].shape == (4, 3, 8, 8)  # padded to its bucket by the preparer
    [got] = model.submit(batch).result()
    np.testing.assert_allclose(got, want, atol=0.05, rtol=1e-3)


@TORCHSCRIPT_DEPRECATED
@pytest.mark.parametrize("on_device", [False, True], ids=["cpu-path", "device-path"])
def test_an_image_that_does_not_decode_is_answered_alone(
    image_dir: Path, monkeypatch: pytest.MonkeyPatch, on_device: bool
) -> None:
    registry = ModelRegistry(image_dir, device=CPU)
    registry.load_all()
    if on_device:
        _device_path(registry)
    pipeline = Pipeline(Settings(model_dir=image_dir), registry, None, Metrics())
    good = encoded("JPEG", (8, 8), seed=5)
    cut = cut_jpeg(6)
    jobs = []
    for i, data in enumerate([good, cut, good]):
        tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": data}
        body = {"id": f"r{i}", "model": "img", "inputs": [tensor]}
        value = codec.encode(body, codec.MSGPACK)
        headers = [(codec.CONTENT_TYPE_HEADER, codec.MSGPACK.encode())]
        jobs.append(pipeline.admit(Origin("t", 0, i, now_ms(), value, headers=headers)))
    stacked = []
    real = registry.resolve("img").stack_inputs

    def count(rows):  # type: ignore[no-untyped-def]
        stacked.append(len(rows))
        return real(rows)

    monkeypatch.setattr(registry.resolve("img"), "stack_inputs", count)
    outcomes = pipeline.finish(pipeline.start(jobs))
    assert [o.error.code if o.error else "ok" for o in outcomes] == ["ok", "bad_image", "ok"]
    assert stacked == [3]  # one batch: no bisection
    assert outcomes[1].error is not None and "cannot be decoded" in outcomes[1].error.message
    np.testing.assert_allclose(
        outcomes[0].outputs[0],  # type: ignore[index]
        outcomes[2].outputs[0],  # type: ignore[index]
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    # Its DLQ record and error answer; the others' answers.
    settings = pipeline.settings
    records = [r for _, recs in pipeline.response_records(outcomes, "infer") for r in recs]
    assert [r.topic for r in records].count(settings.dlq_topic) == 1
    assert [r.topic for r in records].count(settings.responses_topic) == 3
    dlq = next(r for r in records if r.topic == settings.dlq_topic)
    assert json.loads(dlq.value)["reason"] == "bad_image"
    pipeline.close()


@pytest.mark.parametrize(
    "fmt, mode, options",
    [
        ("JPEG", "RGB", {}),
        ("JPEG", "RGB", {"progressive": True, "optimize": True}),
        ("JPEG", "L", {}),
        ("JPEG", "CMYK", {}),
        ("JPEG", "RGB", {"exif": b"Exif\x00\x00" + b"\x00" * 64, "subsampling": 0}),
        ("PNG", "RGBA", {}),
        ("PNG", "L", {}),
    ],
    ids=["baseline", "progressive", "grey", "cmyk", "exif", "png-rgba", "png-grey"],
)
def test_the_header_gives_the_size_pillow_gives(fmt: str, mode: str, options: dict) -> None:
    from pipeline.protocol.codec import Tensor

    image = Image.new(mode, (37, 23))
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    data = buf.getvalue()
    inputs = ImageInputs(config())
    assert inputs.check(Tensor("image", "BYTES", [1], data)) == data
    limited = ImageInputs(config(max_pixels=37 * 23 - 1))
    with pytest.raises(RequestError, match="37x23"):
        limited.check(Tensor("image", "BYTES", [1], data))


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xd8\xff",  # nothing after the start
        b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01",  # cut inside a segment
        b"\xff\xd8\xff\xda\x00\x08" + b"\x00" * 16,  # a scan before any frame header
        b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x00\x00\x00\x03",  # a 0x0 frame
        b"\xff\xd8\x00\x00" + b"\x00" * 16,  # not a marker where one must be
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 20,  # no IHDR
    ],
    ids=["start-only", "cut", "scan-first", "zero-size", "no-marker", "png-no-ihdr"],
)
def test_headers_that_do_not_hold_together_are_bad_images(data: bytes) -> None:
    from pipeline.protocol.codec import Tensor

    with pytest.raises(RequestError) as exc:
        ImageInputs(config()).check(Tensor("image", "BYTES", [1], data))
    assert exc.value.code == "bad_image"


class ForkedByHand:
    """torchvision's nvJPEG call forked onto torch's threads, stood in for: each `start`
    returns a future that the test completes when it chooses, with Pillow's pixels, or with
    the RuntimeError a JPEG that does not decode makes nvJPEG raise for its whole list."""

    def __init__(self) -> None:
        self.started: list[tuple[list[torch.Tensor], torch.futures.Future]] = []

    def start(self, parts: list[torch.Tensor], mode: int, device: torch.device) -> object:
        future: torch.futures.Future = torch.futures.Future()
        self.started.append((parts, future))
        return future

    def complete(self, i: int) -> None:
        parts, future = self.started[i]
        decoded = [pillow(p) for p in parts]
        if any(d is None for d in decoded):
            future.set_exception(RuntimeError("nvjpegDecodeBatched failed"))
        else:
            future.set_result(decoded)


def pillow(part: torch.Tensor) -> torch.Tensor | None:
    try:
        with Image.open(io.BytesIO(part.numpy().tobytes())) as image:
            pixels = np.array(image.convert("RGB"), dtype=np.uint8)
    except OSError:
        return None
    return torch.from_numpy(pixels).permute(2, 0, 1)


@pytest.fixture
def forked(monkeypatch: pytest.MonkeyPatch) -> ForkedByHand:
    from pipeline.models import images

    decoder = ForkedByHand()
    monkeypatch.setattr(images, "_forked_decoder", lambda: decoder)
    monkeypatch.setattr(
        DeviceImageInputs, "_one_by_one", lambda self, parts: [pillow(p) for p in parts]
    )
    return decoder


def test_a_forked_batch_returns_before_it_decodes_then_matches_pillows(
    forked: ForkedByHand,
) -> None:
    cfg = config()
    rows = [encoded("JPEG", (8 + i, 8), seed=i) for i in range(3)]
    rows += [encoded("PNG", (8, 8), seed=9), cut_jpeg(4)]
    preparing = DeviceImageInputs(cfg, CPU, "nvjpeg-forked").begin(rows, 8)
    assert not preparing.done()
    assert len(forked.started) == 1 and len(forked.started[0][0]) == 4  # the PNG: Pillow's
    forked.complete(0)  # the cut JPEG fails the list: each is decoded again alone
    assert preparing.done()
    [got], extras = preparing.result()
    [want], want_extras = DeviceImageInputs(cfg, CPU, "pil").prepare(rows, 8)
    assert got.shape == (8, 3, 8, 8)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert extras["errors"][:4] == [None] * 4
    assert extras["errors"] == want_extras["errors"]


def test_a_torchvision_without_the_batched_op_falls_back_to_nvjpeg(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from pipeline.models import images

    def missing() -> None:
        raise RuntimeError("Unknown builtin op: image::decode_jpegs_cuda")

    monkeypatch.setattr(images, "_forked_decoder", missing)
    with caplog.at_level(logging.WARNING):
        inputs = DeviceImageInputs(config(), CPU, "nvjpeg-forked")
    assert inputs.decoder == "nvjpeg" and "decode_jpegs_cuda" in caplog.text


def _requests(rows: list[bytes], first: int) -> list[Origin]:
    origins = []
    for i, data in enumerate(rows, first):
        tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": data}
        value = codec.encode({"id": f"r{i}", "model": "img", "inputs": [tensor]}, codec.MSGPACK)
        headers = [(codec.CONTENT_TYPE_HEADER, codec.MSGPACK.encode())]
        origins.append(Origin("t", 0, i, now_ms(), value, headers=headers))
    return origins


@TORCHSCRIPT_DEPRECATED
@pytest.mark.timeout(60)
def test_the_engine_consumes_while_a_batch_decodes_and_starts_the_next_once_it_has(
    image_dir: Path, forked: ForkedByHand
) -> None:
    from pipeline.engines.compute import Compute
    from pipeline.engines.offsets import ConsumedBatch

    registry = ModelRegistry(image_dir, device=CPU)
    settings = Settings(model_dir=image_dir, max_batch_size=4, max_delay_s=0.5)
    pipeline = Pipeline(settings, registry, None, Metrics())  # loads the model anew
    model = registry.resolve("img")
    rows = [encoded("JPEG", (8 + i % 3, 8), seed=i) for i in range(5)]
    model.inputs.preparer = DeviceImageInputs(model.config, CPU, "pil")  # at once
    want = model.run([rows])[0]
    model.inputs.preparer = DeviceImageInputs(model.config, CPU, "nvjpeg-forked")
    answered: list[str] = []
    got: list[np.ndarray] = []

    def answer(outcomes: list) -> None:  # type: ignore[type-arg]
        for o in outcomes:
            assert o.error is None, o.error
            answered.append(o.job.request.id)
            got.append(o.outputs[0])

    compute = Compute(settings, pipeline, False, answer, lambda rejected, batch: None)
    compute.admit(_requests(rows[:3], 0), ConsumedBatch({}))
    compute.advance(compute.room)  # the model is idle: the three go at once
    assert len(forked.started) == 1 and compute.wait_s() <= 0.001
    compute.admit(_requests(rows[3:], 3), ConsumedBatch({}))
    compute.advance(compute.room)  # returns while the first decodes; the rest wait for it
    assert len(forked.started) == 1 and not answered
    forked.complete(0)
    compute.advance(compute.room)  # the first computes, the second starts decoding
    assert len(forked.started) == 2 and len(forked.started[1][0]) == 2
    assert answered == ["r0", "r1", "r2"]
    threading.Timer(0.05, forked.complete, (1,)).start()
    compute.drain()  # waits for the decoder
    assert answered == [f"r{i}" for i in range(5)]
    np.testing.assert_allclose(np.stack(got), want, rtol=1e-4, atol=1e-4)
    pipeline.close()
