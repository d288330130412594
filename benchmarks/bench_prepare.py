"""``python -m benchmarks.bench_prepare``: where a JPEG batch's time goes in the worker,
without Kafka. One process, the ``jpeg`` scenario's ResNet-50 and images, batches of
``--batch``; images/s of each step alone and chained, measured one after another:

- ``decode``: torchvision's ``decode_jpeg`` on lists of a batch (stacked), back to back;
- ``prepare``: the worker's preparer (`DeviceImageInputs.prepare`: decode, resize and
  normalise into one tensor), back to back;
- ``worker``: batches stacked and submitted on one preparation thread and their results
  waited for on the calling thread, ``--depth`` batches in flight: how the batch engine runs
  a model whose inputs are prepared on the worker (`pipeline.serving.execution`);
- ``engine``: the batch engine's device side (`Compute`: the batcher, the preparation
  thread, batches in flight) fed MessagePack JPEG requests as the consumer hands them over,
  its answers encoded as for Kafka and dropped: the worker less Kafka;
- ``bare_jpeg``: `benchmarks.bench_jpeg.bare_jpeg` (decode on a second thread and stream,
  normalise and the model on the first);
- ``model``: the model alone on device-resident batches (`bench_gpu.bare_rps`).

Prints one JSON line. ``--compile`` runs the model through torch.compile (``default``).
Without a GPU, tiny sizes smoke-test the same code on the CPU decode path.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from benchmarks import bench_gpu, bench_jpeg
from benchmarks.bench import Load
from benchmarks.images import make_jpegs
from pipeline.config import Settings
from pipeline.engines.compute import Compute
from pipeline.engines.offsets import ConsumedBatch
from pipeline.models import ModelRegistry
from pipeline.models.loaded import LoadedModel
from pipeline.models.runtime import Pending
from pipeline.observability.metrics import Metrics
from pipeline.protocol import codec
from pipeline.serving import Origin, Outcome, Pipeline


def run(batch: int, seconds: float, depth: int, compile_mode: str | None) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale = bench_jpeg.scale_for(device)
    scale = dataclasses.replace(
        scale, model_batch={**scale.model_batch, "resnet": batch}, compile=compile_mode or False
    )
    assert scale.jpeg is not None
    out: dict[str, Any] = {"batch": batch, "depth": depth, "compile": compile_mode or "eager"}
    out["device"] = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory(prefix="sluice-prepare-") as tmp:
        bench_gpu.build_models(Path(tmp), scale, device)
        registry = ModelRegistry(Path(tmp), device)
        loaded = registry.resolve("resnet")
        out["decoder"] = getattr(loaded.inputs.preparer, "decoder", "cpu")
        images = make_jpegs(4 * batch, size=scale.jpeg.size[0])
        batches = [images[i : i + batch] for i in range(0, len(images), batch)]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        rps: dict[str, float] = {}
        with torch.inference_mode():
            if out["decoder"] in ("nvjpeg", "nvjpeg-forked"):  # bare JPEG's decode, stacked
                decode = bench_jpeg._decoders(images, batch, device)["nvjpeg"]
                rps["decode"] = _rate(decode, batch, seconds, sync)
            rows = [[[image] for image in chunk] for chunk in batches]
            rps["prepare"] = _rate(
                lambda i: loaded.stack_inputs(rows[i % len(rows)]).release(), batch, seconds, sync
            )
            rps["worker"], out["worker_steps_ms"] = _worker_rate(loaded, rows, seconds, depth)
            rps["engine"], out["engine_steps_ms"] = _engine_rate(registry, batch, seconds)
            rps["bare_jpeg"] = bench_jpeg.bare_jpeg(registry, "resnet", batch, seconds)["bare_rps"]
            rps["model"] = bench_gpu.bare_rps(registry, "resnet", batch, seconds)
        out["images_per_s"] = {k: round(v, 1) for k, v in rps.items()}
        out["worker_over_bare_jpeg"] = round(rps["worker"] / rps["bare_jpeg"], 3)
    return out


def _rate(step: Any, batch: int, seconds: float, sync: Any) -> float:
    """Images/s of ``step(i)`` (one batch each), timed for ``seconds`` after three warm calls."""
    calls = 0

    def forward() -> None:
        nonlocal calls
        step(calls)
        calls += 1

    return bench_gpu.examples_per_s(forward, batch, seconds, sync)


def _worker_rate(
    loaded: LoadedModel, rows: list[list[list[bytes]]], seconds: float, depth: int
) -> tuple[float, dict[str, float]]:
    """Images/s through the worker's own steps: `LoadedModel.stack_inputs` and `submit` on
    one preparation thread, `Pending.result` here, ``depth`` batches in flight; and the
    steps' milliseconds per batch (`_Steps`)."""
    steps = _Steps()

    def submit(i: int) -> Pending:
        with torch.inference_mode(), steps.timed("prepare_and_submit"):
            return loaded.submit(loaded.stack_inputs(rows[i % len(rows)]))

    with ThreadPoolExecutor(1, thread_name_prefix="sluice-prepare") as thread, steps.patched():
        flight: deque[Future[Pending]] = deque()
        started = done = images = 0
        start = elapsed = 0.0
        while not elapsed:
            while len(flight) < depth:
                flight.append(thread.submit(submit, started))
                started += 1
            flight.popleft().result().result()
            done += 1
            if done == 3:  # warm
                start = time.perf_counter()
                steps.spans.clear()
            elif done > 3:
                images += len(rows[(done - 1) % len(rows)])
                if time.perf_counter() - start >= seconds:
                    elapsed = time.perf_counter() - start
        batches = done - 3
        for f in flight:
            f.result().result()
    return images / elapsed, steps.per_batch(batches)


def _engine_rate(
    registry: ModelRegistry, batch: int, seconds: float
) -> tuple[float, dict[str, float]]:
    """Requests/s through `Compute`, admitted ``batch`` at a time while it has room; and
    each step's mean milliseconds per batch (`_Steps`)."""
    settings = Settings.from_env().replace(
        max_batch_size=batch, max_delay_s=0.004, max_inflight=8 * batch
    )
    pipeline = Pipeline(settings, registry, None, Metrics())
    answered = 0
    steps = _Steps()

    def answer(outcomes: list[Outcome]) -> None:
        nonlocal answered
        with steps.timed("answer"):
            pipeline.response_records(outcomes, "infer")
        answered += len(outcomes)

    compute = Compute(settings, pipeline, False, answer, lambda _rejected, _batch: None)
    load = Load.build(registry, "resnet", codec.MSGPACK)
    values = [load.request(i, "r")[1] for i in range(4 * batch)]
    offset = 0
    start = 0.0
    with steps.patched():
        try:
            while True:
                room = compute.room
                if room > 0:
                    now = time.time() * 1000
                    origins = [
                        Origin(settings.requests_topic, 0, offset + i, now,
                               values[(offset + i) % len(values)], load.headers or [], key_bytes=4)
                        for i in range(min(room, batch))
                    ]  # fmt: skip
                    offset += len(origins)
                    with steps.timed("admit"):
                        compute.admit(origins, ConsumedBatch({}))
                compute.advance(room)
                if not start and answered >= 3 * batch:  # warm
                    start, counted = time.perf_counter(), answered
                    steps.spans.clear()
                elif start and time.perf_counter() - start >= seconds:
                    batches = (answered - counted) / batch
                    rate = (answered - counted) / (time.perf_counter() - start)
                    return rate, steps.per_batch(batches)
        finally:
            compute.drain()
            pipeline.close()


class _Steps:
    """Wall and CPU time (the thread's own) spent in the engine's steps, on whichever thread
    runs them: the loop's (admit, answer, collect: waiting for the oldest batch and
    answering it) and the preparation thread's (prepare_and_submit, of which gpu_decode); with
    ``nvjpeg-forked``, the loop's finish_and_submit of a batch its decoder has decoded.
    A step whose wall time is well above its CPU time waited: for the GIL, or the device."""

    def __init__(self) -> None:
        self.spans: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            spans = self.spans
            spans[name] = spans.get(name, 0.0) + time.perf_counter() - t0
            spans[name + "_cpu"] = spans.get(name + "_cpu", 0.0) + time.thread_time() - c0

    def wrap(self, name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.timed(name):
                return fn(*args, **kwargs)

        return timed

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        from pipeline.models.images import DeviceImageInputs
        from pipeline.serving import execution

        originals = [
            (execution, "_submit", "prepare_and_submit"),
            (execution._Submission, "result", "finish_and_submit"),  # nvjpeg-forked
            (DeviceImageInputs, "_gpu_decode", "gpu_decode"),
            (Compute, "_collect_one", "collect"),
        ]
        saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in originals]
        for owner, attr, name in originals:
            setattr(owner, attr, self.wrap(name, getattr(owner, attr)))
        try:
            yield
        finally:
            for owner, attr, fn in saved:
                setattr(owner, attr, fn)

    def per_batch(self, batches: float) -> dict[str, float]:
        return {k: round(v * 1000 / batches, 3) for k, v in sorted(self.spans.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--compile", default=None, help="torch.compile mode (default: eager)")
    args = parser.parse_args()
    print(json.dumps(run(args.batch, args.seconds, args.depth, args.compile), sort_keys=True))


if __name__ == "__main__":
    main()
