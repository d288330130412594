"""``python -m benchmarks.bench_decode``: what JPEG images cost before a model sees them.

Two questions the GPU image path depends on, measured on the seeded image set
(`benchmarks.images`, 224×224 at quality 90, 12–16 KB each):

- **Decode**, in batches (``--batch``), each path timed for ``--seconds`` after a warm-up,
  images/s:
  - ``pil_1`` / ``pil_threads``: Pillow on one thread / on every core (it releases the GIL
    while it decodes): the CPU path sluice has today (`pipeline.models.images`);
  - ``torchvision_cpu``: ``torchvision.io.decode_jpeg`` on the CPU (libjpeg-turbo);
  - ``torchvision_cuda``: the same on the GPU (nvJPEG, a list at a time: torchvision sends
    baseline JPEGs to the hardware JPEG engines where the GPU has them), and
    ``torchvision_cuda_prep`` with the preprocessing a ResNet-50 needs (to float16,
    ``(x/255 - mean)/std``, channels-last);
  - ``nvimgcodec_hw`` / ``nvimgcodec_gpu``: nvImageCodec (PyPI ``nvidia-nvimgcodec-cu13``
    with ``nvidia-nvjpeg``) on the hardware JPEG engines, and on the SMs.

  A path whose library or device is missing reports why instead of a figure. Each GPU path's
  pixels are compared with Pillow's (mean and max absolute difference): JPEG decoders differ
  slightly in their IDCT and chroma upsampling.
- **The broker** (``--broker``): the images produced as fast as one producer goes to a
  one-partition topic and read back by one consumer, per ``compression.type`` (none, lz4,
  zstd): records/s and MB/s of image bytes, producing and end to end. Whether the broker
  bounds a pipeline of images comes down to these against the model's images/s.

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from benchmarks.images import make_jpegs

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _rate(fn: Callable[[list[bytes]], Any], batches: list[list[bytes]], seconds: float) -> float:
    """Images/s of ``fn`` over ``batches`` in turn for ``seconds`` (after one warm-up pass)."""
    for b in batches[:2]:
        fn(b)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for b in batches:
            fn(b)
            done += len(b)
    return round(done / (time.perf_counter() - start), 1)


def _pil(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def decode_paths(images: list[bytes], batch: int, seconds: float) -> dict[str, Any]:
    """Images/s of every decode path this machine has (see the module docstring)."""
    batches = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]
    reference = [_pil(b) for b in batches[0]]
    out: dict[str, Any] = {"pil_1": _rate(lambda b: [_pil(x) for x in b], batches, seconds)}
    cores = os.cpu_count() or 1
    with ThreadPoolExecutor(cores) as pool:
        out["pil_threads"] = _rate(lambda b: list(pool.map(_pil, b)), batches, seconds)
    out["cores"] = cores
    try:
        import torch
        import torchvision.io as tvio
    except ImportError as exc:
        out["torchvision"] = f"unavailable: {exc}"
        return out
    raw = [[torch.frombuffer(bytearray(x), dtype=torch.uint8) for x in b] for b in batches]
    by_id = {id(b): r for b, r in zip(batches, raw, strict=True)}
    out["torchvision_cpu"] = _rate(lambda b: tvio.decode_jpeg(by_id[id(b)]), batches, seconds)
    if not torch.cuda.is_available():
        out["cuda"] = "unavailable: no CUDA device"
        return out
    cuda = torch.device("cuda")
    mean = torch.tensor(MEAN, device=cuda).view(1, 3, 1, 1) * 255
    inv_std = 1 / (torch.tensor(STD, device=cuda).view(1, 3, 1, 1) * 255)

    def tv_cuda(b: list[bytes]) -> list[Any]:
        decoded = tvio.decode_jpeg(by_id[id(b)], device=cuda)
        torch.cuda.synchronize()
        return decoded

    def tv_cuda_prep(b: list[bytes]) -> Any:
        x = torch.stack(tvio.decode_jpeg(by_id[id(b)], device=cuda)).half()
        x = ((x - mean) * inv_std).contiguous(memory_format=torch.channels_last)
        torch.cuda.synchronize()
        return x

    out["torchvision_cuda"] = _rate(tv_cuda, batches, seconds)
    out["torchvision_cuda_prep"] = _rate(tv_cuda_prep, batches, seconds)
    got = [t.permute(1, 2, 0).cpu().numpy() for t in tv_cuda(batches[0])]
    out["torchvision_cuda_vs_pil"] = _difference(got, reference)
    out.update(_nvimgcodec(batches, seconds, reference))
    return out


def _nvimgcodec(
    batches: list[list[bytes]], seconds: float, reference: list[np.ndarray]
) -> dict[str, Any]:
    try:
        from nvidia import nvimgcodec
    except ImportError as exc:
        return {"nvimgcodec": f"unavailable: {exc}"}
    import torch

    out: dict[str, Any] = {"nvimgcodec_version": getattr(nvimgcodec, "__version__", "?")}
    for name, kind in (("hw", "HW_GPU_ONLY"), ("gpu", "GPU_ONLY")):
        try:
            backend = nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, kind))
            decoder = nvimgcodec.Decoder(backends=[backend])

            def decode(b: list[bytes], decoder: Any = decoder) -> list[Any]:
                images = decoder.decode(b)
                tensors = [torch.as_tensor(i, device="cuda") for i in images]
                torch.cuda.synchronize()
                return tensors

            first = decode(batches[0])
            if any(t is None for t in first):
                raise RuntimeError("some images were not decoded")
            out[f"nvimgcodec_{name}"] = _rate(decode, batches, seconds)
            out[f"nvimgcodec_{name}_vs_pil"] = _difference(
                [t.cpu().numpy() for t in first], reference
            )
        except Exception as exc:  # noqa: BLE001 - a backend this machine lacks: say why
            out[f"nvimgcodec_{name}"] = f"unavailable: {type(exc).__name__}: {exc}"
    return out


def _difference(got: list[np.ndarray], want: list[np.ndarray]) -> dict[str, float]:
    diffs = [
        np.abs(g.astype(np.int16) - w.astype(np.int16)) for g, w in zip(got, want, strict=True)
    ]
    return {
        "mean_abs": round(float(np.mean([d.mean() for d in diffs])), 3),
        "max_abs": int(max(d.max() for d in diffs)),
    }


def broker(settings: Any, images: list[bytes], n: int) -> dict[str, Any]:
    """Produce ``n`` image records (the set in turn) and read them back, per compression."""
    from confluent_kafka import Producer

    from pipeline.kafka import (
        consume_batch,
        delete_topics,
        ensure_topics,
        producer_config,
        topic_reader,
    )

    out: dict[str, Any] = {
        "records": n,
        "mean_image_bytes": round(float(np.mean([len(i) for i in images]))),
    }
    for compression in ("none", "lz4", "zstd"):
        topic = f"{settings.topic_prefix}-bytes-{compression}-{uuid.uuid4().hex[:6]}"
        ensure_topics(settings.replace(partitions=1), [topic])
        try:
            producer = Producer(producer_config(settings, **{"compression.type": compression,
                                                             "linger.ms": 5}))  # fmt: skip
            reader = topic_reader(
                settings, topic, f"bytes-{uuid.uuid4().hex[:8]}", "read_uncommitted"
            )
            total = 0
            start = time.perf_counter()
            for i in range(n):
                image = images[i % len(images)]
                total += len(image)
                while True:
                    try:
                        producer.produce(topic, image)
                        break
                    except BufferError:
                        producer.poll(0.005)
                producer.poll(0)
            producer.flush(60)
            produced_s = time.perf_counter() - start
            got = 0
            deadline = time.monotonic() + 120
            while got < n and time.monotonic() < deadline:
                got += sum(1 for m in consume_batch(reader, 5000, 0.5) if m.error() is None)
            end_s = time.perf_counter() - start
            reader.close()
            out[compression] = {
                "produce_rps": round(n / produced_s, 1),
                "produce_mb_s": round(total / produced_s / 1e6, 1),
                "end_to_end_rps": round(got / end_s, 1),
                "end_to_end_mb_s": round(total * got / n / end_s / 1e6, 1),
                "read_back": got,
            }
        finally:
            delete_topics(settings, [topic])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="JPEG decode paths and the broker with images.")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--broker", action="store_true", help="also the broker with images")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--skip-decode", action="store_true", help="the broker alone")
    args = parser.parse_args()
    images = make_jpegs(args.images)
    result: dict[str, Any] = {
        "scenario": "decode",
        "images": args.images,
        "batch": min(args.batch, args.images),
        "mean_image_bytes": round(float(np.mean([len(i) for i in images]))),
    }
    if not args.skip_decode:
        result["decode"] = decode_paths(images, min(args.batch, args.images), args.seconds)
    if args.broker:
        from pipeline.config import Settings
        from pipeline.ops.broker import running

        with running(Settings.from_env()) as settings:
            result["broker"] = broker(settings, images, args.records)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
