"""``sluice bench --scenario models``: a real text model through Kafka, against its peers.

all-MiniLM-L6-v2 (text in, embedding out), in one run on one machine:

- ``bare``: the model alone on pre-tokenized batches of the demo sentences (the worker's
  largest batch bucket), no Kafka: the ceiling;
- ``per_message``: a plain confluent-kafka consumer loop that calls the model library
  (sentence-transformers) once per message and produces each answer: what a user writes
  first;
- ``pipeline``: the sluice worker (fused, batch engine) at its maximum (every request sent
  at once), and then open loop at half that rate for its latencies.

Every answer is checked against the model's direct output. The last stdout line is one JSON
object; ratios compare figures from this one run.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import bench
from pipeline.config import Settings
from pipeline.models import DEMO_TEXTS, LoadedModel, ModelRegistry, init_minilm
from pipeline.ops import procs
from pipeline.protocol import codec


def bare_rps(model: LoadedModel, seconds: float) -> dict[str, Any]:
    """Texts per second of the model alone on one pre-tokenized batch of demo sentences."""
    size = min(model.max_batch_size, model.batch_buckets[-1])
    rows = [[DEMO_TEXTS[i % len(DEMO_TEXTS)][1]] for i in range(size)]
    batch = model.stack_inputs(rows)
    tensors = [t.to(model.device) for t in batch.tensors]
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        model.module(*tensors)  # warm
        sync()
        start, done = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            model.module(*tensors)
            done += size
        sync()
        elapsed = time.perf_counter() - start
    batch.release()
    return {"texts_per_s": round(done / elapsed, 1), "batch": size,
            "seq_len": int(tensors[0].shape[1])}  # fmt: skip


def per_message(settings: Settings, model: str) -> None:
    """The per-message peer: consume one request, encode its text with
    sentence-transformers, produce the answer; until SIGTERM."""
    from confluent_kafka import Consumer, Producer
    from sentence_transformers import SentenceTransformer

    from pipeline.kafka import consumer_config, producer_config
    from pipeline.kafka.produce import produce

    registry = ModelRegistry(settings.models_path, torch.device("cpu"))
    version = registry.versions(model)[-1]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = SentenceTransformer(str(settings.models_path / model / version / "hf"), device=device)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    consumer = Consumer(consumer_config(settings, settings.group_id("per-message")))
    producer = Producer(producer_config(settings))
    consumer.subscribe([settings.requests_topic])
    try:
        while not stop.is_set():
            m = consumer.poll(0.05)
            if m is None or m.error() is not None:
                continue
            request = codec.decode_request(m.value(), settings.max_payload_bytes)
            text = str(request.inputs[0].data[0])  # type: ignore[index]
            vector = encoder.encode([text], normalize_embeddings=True)[0]
            response = codec.Response(
                id=request.id, status="ok", model=model, model_version=version,
                outputs=[codec.Tensor("embedding", "FP32", [len(vector)], vector.tolist())],
            )  # fmt: skip
            produce(producer, settings.responses_topic, codec.encode(response), m.key())
            producer.poll(0)
    finally:
        producer.flush(10)
        consumer.close()


def run(
    settings: Settings,
    requests: int | None = None,
    rate: float | None = None,
    progress: bool = True,
    model: str = "minilm",
) -> dict[str, Any]:
    """Bare, per-message peer and pipeline for MiniLM; ``requests`` per pipeline run."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Every process here computes with as many threads as the machine has cores: the bare
    # model, the peer (torch's default) and the worker (SLUICE_TORCH_THREADS, default 1, a
    # small model's best) alike.
    threads = torch.get_num_threads()
    settings = settings.replace(torch_threads=threads)
    init_minilm(settings.models_path, model)
    registry = ModelRegistry(settings.models_path, device)
    loaded = registry.resolve(model)
    bare = bare_rps(loaded, 10.0)
    del registry, loaded
    cpu = device.type == "cpu"
    n = requests or (2000 if cpu else 50_000)

    def peer(s: Settings, log_dir: Path) -> list[Any]:
        return [procs.spawn(s, ["relay", "--per-message", model], log_dir / "peer.log")]

    def drive(mode: str, count: int, at: float | None, **kw: Any) -> dict[str, Any]:
        return bench.run(settings, mode, count, at, progress=progress, model=model, **kw)

    peer_run = drive("per-message", max(200, n // 8), None, spawn=peer)
    pipeline = drive("fused", n, None)
    half_rate = rate or round(pipeline["throughput_rps"] / 2, 1)
    half = drive("fused", max(200, n // 2), half_rate)
    pipe_rps = pipeline["throughput_rps"]
    result = {
        "scenario": "models",
        "model": model,
        "device": torch.cuda.get_device_name(0)
        if not cpu
        else f"cpu ({torch.get_num_threads()} threads)",
        "bare": bare,
        "per_message": _brief(peer_run),
        "pipeline": _brief(pipeline),
        "pipeline_at_half": _brief(half),
        "ratios": {
            "pipeline_over_per_message": _ratio(pipe_rps, peer_run["throughput_rps"]),
            "pipeline_over_bare": _ratio(pipe_rps, bare["texts_per_s"]),
        },
        "bound": (
            "the model's compute: the pipeline runs at "
            f"{_ratio(pipe_rps, bare['texts_per_s'])} of the bare model on the same cores, "
            "which it shares with the tokenizer, the broker and the load generator"
        ),
    }
    return result


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("sent", "answered", "outcomes", "wrong_outputs", "offered_rps", "throughput_rps",
            "latency_ms", "mean_batch_size")  # fmt: skip
    return {k: summary.get(k) for k in keys}


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None
