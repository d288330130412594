"""``sluice bench --scenario jpeg``: images as users send them. ResNet-50's requests carry
JPEG bytes (the seeded set, `benchmarks.images`: 224×224, quality 90, 12–16 KB), decoded,
resized and normalised on the GPU by the worker; BERT-base runs beside it as in the ``gpu``
scenario. One run, one machine.

Per model, the ``gpu`` scenario's keys (`benchmarks.bench_gpu`), and:

- ResNet: ``bare_rps`` is **bare JPEG**: a plain script that decodes host JPEG bytes on the
  GPU, normalises them and runs the model, batch after batch, decoding batch N+1 on a
  second thread and stream while the model runs batch N, on the fastest decoder this
  machine has (``bare_jpeg_rps`` per decoder); ``bare_model_rps`` is the model alone on
  device-resident tensors (what decoding costs is the difference). ``ratio`` is the
  pipeline over bare JPEG.
- ``p99_ms_runs``: three open-loop runs in a row at 75 % of the maximum, each on fresh
  topics; ``p99_ms`` is the worst of them.
- ``decoder``: the worker's decode path (``image.decode``: nvjpeg, nvjpeg-forked, nvimgcodec,
  cpu).

Both models run on the fastest path their config can name: FP16 with CUDA graphs, or
(``SLUICE_BENCH_COMPILE``: ``default``, ``max-autotune``) torch.compile inside the graphs.
``SLUICE_BENCH_DECODE`` (auto, nvjpeg, nvjpeg-forked, nvimgcodec, cpu) picks the worker's decoder,
``SLUICE_BENCH_MODELS`` (``resnet``, say) the models, ``SLUICE_BENCH_P99_RUNS`` the runs,
``SLUICE_BENCH_RESNET_BATCH`` ResNet's largest batch in the pipeline (default 128). Without
a GPU, tiny models on a few hundred requests smoke-test the same code on the CPU path.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from benchmarks import bench_gpu
from benchmarks.images import make_jpegs
from pipeline.config import Settings
from pipeline.models import ModelRegistry
from pipeline.models.config import ImageOptions

IMAGENET = ImageOptions(
    size=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), channels_last=True
)
GPU = dataclasses.replace(bench_gpu.GPU, jpeg=IMAGENET, p99_runs=3)
CPU = dataclasses.replace(
    bench_gpu.CPU, jpeg=dataclasses.replace(IMAGENET, size=(32, 32)), p99_runs=3, requests=200
)


def scale_for(device: torch.device) -> bench_gpu.Scale:
    """This machine's scale, with the environment's decoder and compile mode."""
    scale = GPU if device.type == "cuda" else CPU
    assert scale.jpeg is not None
    decode = os.environ.get("SLUICE_BENCH_DECODE", "auto")
    compile_mode: bool | str = os.environ.get("SLUICE_BENCH_COMPILE", "") or False
    runs = int(os.environ.get("SLUICE_BENCH_P99_RUNS", scale.p99_runs))
    model_batch = dict(scale.model_batch)
    if "SLUICE_BENCH_RESNET_BATCH" in os.environ:
        model_batch["resnet"] = int(os.environ["SLUICE_BENCH_RESNET_BATCH"])
    jpeg = dataclasses.replace(scale.jpeg, decode=decode)
    return dataclasses.replace(
        scale, jpeg=jpeg, compile=compile_mode, p99_runs=runs, model_batch=model_batch
    )


def run(
    settings: Settings,
    requests: int | None = None,
    rate: float | None = None,
    progress: bool = True,
    workers: int = 1,
    generators: int | None = None,
) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = [m for m in os.environ.get("SLUICE_BENCH_MODELS", "").split(",") if m] or None
    result = bench_gpu.run(
        settings, requests, rate, progress, workers, models,
        scale=scale_for(device), generators=generators,
    )  # fmt: skip
    result["scenario"] = "jpeg"
    return result


def bare_jpeg(registry: ModelRegistry, name: str, batch: int, seconds: float) -> dict[str, Any]:
    """Images/s of decode, preprocessing and the model on host JPEG bytes, per decoder this
    machine has (see the module docstring); ``bare_rps``: the fastest."""
    loaded = registry.resolve(name)
    options = loaded.config.image
    assert options is not None
    images = make_jpegs(max(2 * batch, 64), size=options.size[0])
    dev = loaded.device
    dtype = loaded.input_dtype or torch.float32
    mean = (torch.tensor(options.mean, device=dev).view(1, 3, 1, 1) * 255).to(dtype)
    inv_std = (1 / (torch.tensor(options.std, device=dev).view(1, 3, 1, 1) * 255)).to(dtype)
    fmt = torch.channels_last if options.channels_last else torch.contiguous_format
    graphs = loaded.graphs

    def model(pixels: torch.Tensor) -> Any:
        x = ((pixels.to(dtype) - mean) * inv_std).contiguous(memory_format=fmt)
        return graphs([x]) if graphs is not None else loaded.module(x)

    decoders = _decoders(images, batch, dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    out: dict[str, Any] = {}
    with torch.inference_mode(), ThreadPoolExecutor(1) as ahead:
        for decoder, decode in decoders.items():
            overlapped = _Overlapped(decode, ahead, dev)

            def forward(overlapped: _Overlapped = overlapped) -> Any:
                return model(overlapped.next())

            out[decoder] = round(bench_gpu.examples_per_s(forward, batch, seconds, sync), 1)
    return {"bare_jpeg_rps": out, "bare_rps": max(out.values())}


class _Overlapped:
    """Batch i+1 decoded on a thread (and its own CUDA stream) while batch i is used."""

    def __init__(self, decode: Any, pool: ThreadPoolExecutor, dev: torch.device) -> None:
        self.decode = decode
        self.pool = pool
        self.stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        self.i = 0
        self.ahead = pool.submit(self._one, 0)

    def _one(self, i: int) -> tuple[torch.Tensor, Any]:
        with torch.inference_mode():
            if self.stream is None:
                return self.decode(i), None
            with torch.cuda.stream(self.stream):
                pixels = self.decode(i)
                done = torch.cuda.Event()
                done.record(self.stream)
            return pixels, done

    def next(self) -> torch.Tensor:
        pixels, done = self.ahead.result()
        self.i += 1
        self.ahead = self.pool.submit(self._one, self.i)
        if done is not None:
            torch.cuda.current_stream().wait_event(done)
            pixels.record_stream(torch.cuda.current_stream())
        return pixels


def _decoders(images: list[bytes], batch: int, dev: torch.device) -> dict[str, Any]:
    """For each decoder this machine has, a function from a call number to a batch of
    ``(batch, 3, h, w)`` uint8 pixels on ``dev`` (the images in turn)."""
    starts = list(range(0, len(images) - batch + 1, batch))
    chunks = [images[s : s + batch] for s in starts]
    if dev.type != "cuda":
        from benchmarks.bench_decode import _pil

        pool = ThreadPoolExecutor(os.cpu_count() or 1)

        def pil(i: int) -> torch.Tensor:
            pixels = np.stack(list(pool.map(_pil, chunks[i % len(chunks)])))
            return torch.from_numpy(pixels).permute(0, 3, 1, 2)

        return {"pil": pil}
    out: dict[str, Any] = {}
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        raw = [[torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in c] for c in chunks]

        def nvjpeg(i: int) -> torch.Tensor:
            decoded = decode_jpeg(raw[i % len(raw)], mode=ImageReadMode.RGB, device=dev)
            return torch.stack(decoded)

        out["nvjpeg"] = nvjpeg
    except ImportError:
        pass
    try:
        from nvidia import nvimgcodec

        kinds = (nvimgcodec.BackendKind.HW_GPU_ONLY, nvimgcodec.BackendKind.GPU_ONLY)
        codec = nvimgcodec.Decoder(backends=[nvimgcodec.Backend(k) for k in kinds])

        def engines(i: int) -> torch.Tensor:
            stream = torch.cuda.current_stream().cuda_stream
            decoded = codec.decode(chunks[i % len(chunks)], cuda_stream=stream)
            return torch.stack([torch.as_tensor(d, device=dev) for d in decoded]).permute(
                0, 3, 1, 2
            )

        out["nvimgcodec"] = engines
    except ImportError:
        pass
    return out
