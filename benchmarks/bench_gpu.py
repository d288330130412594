"""``sluice bench --scenario gpu``: each reference model bare on the accelerator, then
through the whole pipeline and a real Kafka broker, in one run.

Per model (`pipeline.models.zoo`: a BERT-base-like encoder, a ResNet-50), built with random
weights, saved and loaded through the registry like a user's model:

- ``bare_rps``: the loaded module alone on device-resident batches of ``batch`` (FP16 on a
  GPU), synchronised: what the model achieves with no pipeline.
- ``pipeline_rps``: requests (MessagePack, raw tensor bytes) produced as fast as the
  producer goes through a fused worker and answered; every answer is checked against the
  model's direct output.
- ``gpu_util``: mean NVML utilisation over the measured window of that run.
- ``p99_ms``: end-to-end latency at 75 % of ``pipeline_rps``, open loop.

Without a GPU the same code runs tiny versions of both models on the CPU, a few hundred
requests each, so CI can smoke-test it. The last stdout line is the JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import bench
from pipeline.config import Settings
from pipeline.models import ModelConfig, ModelRegistry, TensorSpec, save_model, zoo
from pipeline.models.config import ImageOptions
from pipeline.observability.gpu import load_nvml
from pipeline.ops import procs
from pipeline.ops.broker import running

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scale:
    """Model sizes, batch and run lengths for one kind of machine."""

    bert: dict[str, Any]
    seq: int
    resnet: dict[str, Any]
    image: int
    batch: int
    precision: str
    requests: int
    cuda_graphs: bool = False
    # Per-model largest batch, where it differs from ``batch`` (the bare model's batch).
    model_batch: dict[str, int] = field(default_factory=dict)
    workers: int = 1
    generators: int | None = None  # load-generator processes (None: `loadgen.auto_count`)
    bare_s: float = 3.0
    max_delay_s: float = 0.004
    tolerance: tuple[float, float] = (1e-4, 1e-5)
    extra: dict[str, Any] = field(default_factory=dict)
    # Open-loop runs at 75 % of the maximum, one after another (their p99s in ``p99_ms_runs``).
    p99_runs: int = 1
    # The models' torch.compile mode (`ModelConfig.compile`), False: eager.
    compile: bool | str = False
    # ResNet's requests carry JPEG bytes, prepared as these options say (`benchmarks.bench_jpeg`).
    jpeg: ImageOptions | None = None


GPU = Scale(
    bert=zoo.BERT_BASE,
    seq=128,
    resnet=zoo.RESNET50,
    image=32,
    batch=256,
    precision="fp16",
    requests=100_000,
    cuda_graphs=True,
    # ResNet-50 computes a batch of 256 in ~19 ms: with the batch's fill time at 75 % load
    # that is p99 ~60 ms; batches of up to 128 keep 0.96 of the bare model's throughput at
    # p99 ~47 ms (both measured on an H100, benchmarks/README.md).
    model_batch={"resnet": 128},
    # Half precision: the pipeline's batches are not the reference batch's, and FP16
    # kernels differ a little with the batch shape.
    tolerance=(3e-2, 3e-2),
)
CPU = Scale(
    bert={
        **zoo.BERT_BASE,
        "vocab_size": 1000,
        "hidden": 32,
        "layers": 2,
        "heads": 4,
        "intermediate": 64,
        "max_positions": 64,
    },  # fmt: skip
    seq=16,
    resnet={"layers": [1, 1, 1, 1], "width": 8, "num_classes": 10, "image_size": 32},
    image=16,
    batch=32,
    precision="fp32",
    requests=400,
    bare_s=1.0,
)


def build_models(
    model_dir: Path, scale: Scale, device: torch.device, buckets: tuple[int, ...] = ()
) -> list[str]:
    """Save ``bert`` and ``resnet`` (version 1, safetensors) with their configs (batch
    buckets up to the model's batch, or ``buckets``)."""
    torch.manual_seed(0)
    bert = zoo.BertEncoder(**scale.bert)
    labels = tuple(f"class_{i}" for i in range(scale.bert["num_labels"]))
    ids = TensorSpec("input_ids", "INT32", (scale.seq,))
    _save(model_dir, "bert", bert, scale, "bert_encoder", scale.bert, ids,
          scale.bert["num_labels"], labels, buckets=buckets)  # fmt: skip
    if scale.jpeg is not None:
        arch = {**scale.resnet, "image_size": scale.jpeg.size[0], "normalized_input": True}
        resnet = zoo.ResNet(**arch)
        zoo.calibrate_batch_norm(resnet.to(device), _normalised_jpegs(scale.jpeg).to(device))
        _save(model_dir, "resnet", resnet.cpu(), scale, "resnet", arch,
              TensorSpec("image", "FP32", scale.jpeg.shape), scale.resnet["num_classes"], (),
              scale.jpeg, buckets)  # fmt: skip
        return ["bert", "resnet"]
    resnet = zoo.ResNet(**scale.resnet)
    images = torch.randint(0, 256, (32, 3, scale.image, scale.image), dtype=torch.uint8)
    zoo.calibrate_batch_norm(resnet.to(device), images.to(device))
    _save(model_dir, "resnet", resnet.cpu(), scale, "resnet", scale.resnet,
          TensorSpec("image", "UINT8", (3, scale.image, scale.image)),
          scale.resnet["num_classes"], (), buckets=buckets)  # fmt: skip
    return ["bert", "resnet"]


def _normalised_jpegs(options: ImageOptions, n: int = 32) -> torch.Tensor:
    """The benchmark's images as the model sees them, for batch-norm calibration."""
    from benchmarks.images import make_jpegs
    from pipeline.models.images import ImageInputs

    config = ModelConfig(
        format="safetensors", inputs=(TensorSpec("image", "FP32", options.shape),),
        outputs=(), image=dataclasses.replace(options, decode="cpu"),
    )  # fmt: skip
    preparer = ImageInputs(config)
    [pixels], _ = preparer.prepare(make_jpegs(n, size=options.size[0]))
    preparer.close()
    return torch.from_numpy(pixels)


def _save(
    model_dir: Path,
    name: str,
    module: torch.nn.Module,
    scale: Scale,
    arch: str,
    arch_config: dict[str, Any],
    spec: TensorSpec,
    n_out: int,
    labels: tuple[str, ...],
    image: ImageOptions | None = None,
    buckets: tuple[int, ...] = (),
) -> None:
    config = ModelConfig(
        format="safetensors",
        inputs=(spec,),
        outputs=(TensorSpec("logits", "FP32", (n_out,)),),
        arch=arch,
        arch_config=dict(arch_config),
        labels=labels,
        image=image,
    )
    path = save_model(model_dir, name, "1", module, config)
    # The runtime's per-model settings: precision, and one batch bucket that the pipeline
    # fills (smaller batches pad up to the next bucket).
    raw = json.loads((path / "config.json").read_text())
    batch = scale.model_batch.get(name, scale.batch)
    buckets = buckets or tuple(sorted({8, 32, 64, 128, batch} & set(range(1, batch + 1))))
    raw.update(precision=scale.precision, max_batch_size=batch, batch_buckets=buckets,
               cuda_graphs=scale.cuda_graphs)  # fmt: skip
    if scale.compile:
        raw["compile"] = scale.compile
    (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")


def bare_rps(registry: ModelRegistry, name: str, batch: int, seconds: float) -> float:
    """Examples/s of the loaded model alone on device-resident batches of ``batch``."""
    loaded = registry.resolve(name)
    rng = np.random.default_rng(1)
    args = [
        torch.from_numpy(bench.random_input(rng, spec, loaded.config.arch_config, batch)).to(
            loaded.device
        )
        for spec in loaded.config.inputs
    ]
    # As the runtime hands them over: in the precision it computes in, laid out as its
    # preparer lays them (channels-last).
    if loaded.input_dtype is not None:
        args = [a.to(loaded.input_dtype) if a.is_floating_point() else a for a in args]
    if loaded.config.image is not None and loaded.config.image.channels_last:
        args = [a.contiguous(memory_format=torch.channels_last) for a in args]
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    # The model as the runtime runs it: through its CUDA graphs where its config asks.
    graphs = loaded.graphs

    def forward() -> Any:
        return graphs(args) if graphs is not None else loaded.module(*args)

    with torch.inference_mode():
        return examples_per_s(forward, batch, seconds, sync)


def examples_per_s(
    forward: Callable[[], Any], batch: int, seconds: float, sync: Callable[[], Any]
) -> float:
    """``batch`` examples per call of ``forward``, timed for ``seconds`` after three warm
    calls; ``sync`` waits for the device (every fifth call, and at the end)."""
    for _ in range(3):
        forward()
    sync()
    start, iterations = time.perf_counter(), 0
    while True:
        forward()
        iterations += 1
        if iterations % 5 == 0:
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return iterations * batch / elapsed


class UtilSampler:
    """NVML utilisation of GPU 0 every ``interval_s``, with perf_counter timestamps."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.samples: list[tuple[float, float]] = []
        self._nvml = load_nvml()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), daemon=True)

    def __enter__(self) -> UtilSampler:
        if self._nvml is not None:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self, interval_s: float) -> None:
        nvml = self._nvml
        assert nvml is not None
        handle = nvml.nvmlDeviceGetHandleByIndex(0)
        while not self._stop.wait(interval_s):
            rates = nvml.nvmlDeviceGetUtilizationRates(handle)
            self.samples.append((time.perf_counter(), rates.gpu / 100.0))

    def mean(self, start: float, end: float) -> float | None:
        inside = [u for t, u in self.samples if start <= t <= end]
        return round(float(np.mean(inside)), 3) if inside else None


def run(
    settings: Settings,
    requests: int | None = None,
    rate: float | None = None,
    progress: bool = True,
    workers: int = 1,
    models: Sequence[str] | None = None,
    scale: Scale | None = None,
    gpus: int | None = None,
    generators: int | None = None,
) -> dict[str, Any]:
    """Bare vs pipeline for each reference model; ``requests`` per pipeline run, through
    ``workers`` worker processes sharing the accelerator, or (``gpus``) through one worker
    per GPU for N = 1, 2, 4, 8 up to ``gpus``, with each N's ``scaling_efficiency``: its
    throughput over N times the one-GPU run's, measured in the same run."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale = dataclasses.replace(
        scale or (GPU if device.type == "cuda" else CPU), workers=workers, generators=generators
    )
    n = requests or scale.requests
    result: dict[str, Any] = {
        "scenario": "gpu",
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "precision": scale.precision,
        "batch": scale.batch,
        "requests": n,
        "workers": workers,
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="sluice-gpu-models-") as tmp:
        model_dir = Path(tmp)
        names = [m for m in build_models(model_dir, scale, device) if not models or m in models]
        registry = ModelRegistry(model_dir, device)
        bare = {name: bare_rps(registry, name, scale.batch, scale.bare_s) for name in names}
        # JPEG requests: the baseline is decode, preprocessing and the model (bare JPEG).
        jpeg: dict[str, Any] = {}
        if scale.jpeg is not None and "resnet" in names:
            from benchmarks.bench_jpeg import bare_jpeg

            loaded = registry.resolve("resnet")
            jpeg = {"bare_model_rps": round(bare["resnet"], 1),
                    "decoder": getattr(loaded.inputs.preparer, "decoder", "cpu"),
                    **bare_jpeg(registry, "resnet", scale.batch, scale.bare_s)}  # fmt: skip
            bare["resnet"] = jpeg.pop("bare_rps")
            jpeg["jpeg_over_model"] = round(bare["resnet"] / jpeg["bare_model_rps"], 3)
        del registry
        if device.type == "cuda":
            torch.cuda.empty_cache()
        run_settings = settings.replace(
            model_dir=model_dir,
            max_batch_size=scale.batch,
            max_delay_s=scale.max_delay_s,
            max_inflight=max(settings.max_inflight, 8 * scale.batch),
            preload_models=True,  # loaded and warmed over every bucket before the probe
        )
        with running(run_settings) as run_settings:
            if gpus:
                result["runs"] = _scaling(run_settings, names, n, bare, scale, gpus, progress)
                return result
            for name in names:
                result["models"][name] = _pipeline(
                    run_settings, name, n, bare[name], scale, rate, progress
                )
                if name == "resnet":
                    result["models"][name].update(jpeg)
    return result


def _scaling(
    settings: Settings,
    names: list[str],
    n: int,
    bare: dict[str, float],
    scale: Scale,
    gpus: int,
    progress: bool,
) -> list[dict[str, Any]]:
    """One worker per GPU (``CUDA_VISIBLE_DEVICES``) in one group, for each N: throughput,
    p99 at 75 % of it, and N's throughput over N times one GPU's."""
    runs: list[dict[str, Any]] = []
    one: dict[str, float] = {}
    for count in bench.counts_up_to(gpus):
        ids = [str(i) for i in range(count)]

        def spawn(s: Settings, log_dir: Path, ids: list[str] = ids) -> list[Any]:
            return procs.spawn_workers(s, "fused", log_dir, gpus=ids)

        per_model = {}
        for name in names:
            figures = _pipeline(
                settings, name, n * count, bare[name],
                dataclasses.replace(scale, workers=count), None, progress, spawn,
            )  # fmt: skip
            one.setdefault(name, figures["pipeline_rps"])
            figures["scaling_efficiency"] = round(figures["pipeline_rps"] / (count * one[name]), 3)
            per_model[name] = figures
            # Each point as it comes: a run cut short still says how far it got.
            sys.stderr.write(f"gpus={count} {name}: {json.dumps(figures)}\n")
        runs.append({"gpus": count, "models": per_model})
    return runs


def _pipeline(
    settings: Settings,
    name: str,
    n: int,
    bare: float,
    scale: Scale,
    rate: float | None,
    progress: bool,
    spawn: Callable[[Settings, Path], list[Any]] | None = None,
) -> dict[str, Any]:
    common = dict(payload="msgpack", workers=scale.workers, model=name,
                  tolerance=scale.tolerance, progress=progress,
                  partitions=max(settings.partitions, scale.workers), spawn=spawn,
                  generators=scale.generators)  # fmt: skip
    with UtilSampler() as sampler:
        top = bench.run(settings, "fused", n, rate, **common)  # type: ignore[arg-type]
    window = top.pop("window_perf_s")
    rps = top["throughput_rps"]
    runs = []
    for _ in range(scale.p99_runs):  # one after another, each on fresh topics
        at = bench.run(settings, "fused", n, 0.75 * rps, **common)  # type: ignore[arg-type]
        at.pop("window_perf_s")
        runs.append(at)
    at = runs[0]
    figures = {
        "bare_rps": round(bare, 1),
        "pipeline_rps": rps,
        "ratio": round(rps / bare, 3) if bare else None,
        "gpu_util": sampler.mean(*window),
        "p99_ms": max(r["latency_ms"]["p99"] for r in runs),
        "p50_ms": at["latency_ms"]["p50"],
        "rate_for_p99": round(0.75 * rps, 1),
        "mean_batch_size": top["mean_batch_size"],
        "sent_rps": top["sent_rps"],
        "generators": top["generators"],
        "answered": top["answered"] + sum(r["answered"] for r in runs),
        "sent": top["sent"] + sum(r["sent"] for r in runs),
        "wrong_outputs": top["wrong_outputs"] + sum(r["wrong_outputs"] for r in runs),
        "workers": scale.workers,
        "worker_cpu_us_per_request": top["worker_cpu_us_per_request"],
    }
    if scale.p99_runs > 1:
        figures["p99_ms_runs"] = [r["latency_ms"]["p99"] for r in runs]
        figures["p50_ms_runs"] = [r["latency_ms"]["p50"] for r in runs]
        figures["mean_batch_size_at_p99"] = [r["mean_batch_size"] for r in runs]
    if progress:
        sys.stderr.write(f"{name}: {json.dumps(figures)}\n")
    return figures
