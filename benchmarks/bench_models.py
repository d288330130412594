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
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from benchmarks import bench
from benchmarks.bench_gpu import examples_per_s
from pipeline.config import Settings
from pipeline.models import LoadedModel, ModelRegistry, init_minilm
from pipeline.ops import procs
from pipeline.protocol import codec


def bare_rps(model: LoadedModel, seconds: float) -> dict[str, Any]:
    """Texts per second of the model alone on one pre-tokenized batch of demo sentences, its
    inputs already on the device (through its CUDA graphs where it has them)."""
    size = min(model.max_batch_size, model.batch_buckets[-1])
    rows = [[bench.demo_text(i)] for i in range(size)]
    batch = model.stack_inputs(rows)
    tensors = [t.to(model.device) for t in batch.tensors]
    if model.input_dtype is not None:
        tensors = [t.to(model.input_dtype) if t.is_floating_point() else t for t in tensors]
    stream = model.streams.compute if model.device.type == "cuda" else None
    sync = stream.synchronize if stream is not None else (lambda: None)

    def call() -> Any:
        return model.graphs(tensors) if model.graphs is not None else model.module(*tensors)

    with torch.inference_mode(), torch.cuda.stream(stream) if stream is not None else nullcontext():
        rate = examples_per_s(call, size, seconds, sync)
    batch.release()
    return {"texts_per_s": round(rate, 1), "batch": size, "seq_len": int(tensors[0].shape[1])}


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
    workers: int = 1,
) -> dict[str, Any]:
    """Bare, per-message peer and pipeline for MiniLM on the CPU; on a GPU, bare and
    pipeline for MiniLM and a BERT-base classifier through torch and ONNX Runtime
    (`run_gpu`). ``requests`` per pipeline run."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return run_gpu(settings, requests, progress, workers)
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
    keys = ("sent", "answered", "outcomes", "wrong_outputs", "offered_rps", "sent_rps",
            "throughput_rps",
            "latency_ms", "mean_batch_size")  # fmt: skip
    return {k: summary.get(k) for k in keys}


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


# -- the GPU: MiniLM and BERT-base, through torch and through ONNX Runtime ------------------

GPU_MODELS = ("minilm", "bert-base")
GPU_RUNTIMES = ("torch", "onnx")
GPU_OPTIONS = {
    "max_batch_size": 256, "batch_buckets": [16, 32, 64, 128, 256],
    "seq_buckets": [16, 32, 64, 128],
}  # fmt: skip


def run_gpu(
    settings: Settings, requests: int | None, progress: bool, workers: int
) -> dict[str, Any]:
    """Each model through each runtime: the bare model on a pre-tokenized batch of 256, and
    the pipeline (``workers`` processes sharing the GPU, tokenizing on their CPUs, MessagePack
    with raw output bytes) at its maximum, answers checked against the model's own."""
    import json
    import os
    import tempfile

    device = torch.device("cuda")
    n = requests or 60_000
    result: dict[str, Any] = {
        "scenario": "models", "device": torch.cuda.get_device_name(0), "workers": workers,
        "requests": n, "payload": "msgpack",
        "texts": f"the demo sentences, each said {os.environ.get('SLUICE_BENCH_TEXT_REPEAT', '1')} "
        "times",
        "models": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="sluice-gpu-text-") as tmp:
        sources, root = Path(tmp) / "sources", Path(tmp) / "models"
        wanted = os.environ.get("SLUICE_BENCH_MODELS")  # e.g. minilm-torch,bert-base-onnx
        names = prepare_gpu_models(sources, root, device,
                                   set(wanted.split(",")) if wanted else None)  # fmt: skip
        for name, info in names.items():
            # Each variant alone in its model directory, loaded (and warmed up) by every
            # worker before it joins the group: no worker loads a model inside the run.
            settings = settings.replace(model_dir=root / name, max_batch_size=256,
                                        preload_models=True)  # fmt: skip
            registry = ModelRegistry(settings.models_path, device)
            bare = bare_rps(registry.resolve(name), 5.0)
            del registry
            torch.cuda.empty_cache()
            pipeline = bench.run(
                settings, "fused", n, None, progress=progress, model=name, payload="msgpack",
                workers=workers, tolerance=(2e-2, 2e-2),
            )  # fmt: skip
            result["models"][name] = {
                **info, "bare": bare, "pipeline": _brief(pipeline),
                "pipeline_over_bare": _ratio(pipeline["throughput_rps"], bare["texts_per_s"]),
            }  # fmt: skip
            print(json.dumps({name: result["models"][name]}), flush=True)
    return result


def prepare_gpu_models(
    sources: Path, model_dir: Path, device: torch.device, wanted: set[str] | None = None
) -> dict[str, Any]:
    """``<model>-<runtime>`` versions, each in ``<model_dir>/<model>-<runtime>/``: MiniLM
    (its packaged weights, or seeded random ones of its architecture where the package is not
    installed: speed does not depend on the values) and a BERT-base sequence classifier
    (bert-base-uncased's shape, seeded random weights, MiniLM's tokenizer: the same
    vocabulary); fp16 with CUDA graphs through torch, fp16 through ONNX Runtime's CUDA
    execution provider."""
    import json
    import os
    import shutil

    import transformers

    from pipeline.models.importer import import_model

    sources.mkdir(parents=True, exist_ok=True)
    try:
        from pipeline.models.demo import minilm_source

        minilm, weights = minilm_source(), "all-MiniLM-L6-v2 (packaged)"
    except Exception:  # noqa: BLE001 - the device has no package: the carried config
        minilm, weights = Path(os.environ["SLUICE_MINILM_DIR"]), "seeded random"
    files = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
             "special_tokens_map.json", "modules.json", "sentence_bert_config.json")  # fmt: skip
    made = {"minilm": sources / "minilm", "bert-base": sources / "bert-base"}
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                       "special_tokens_map.json")  # fmt: skip
    for target in made.values():
        target.mkdir()
        for f in files if target.name == "minilm" else tokenizer_files:
            if (minilm / f).exists():
                shutil.copy(minilm / f, target / f)
    shutil.copytree(minilm / "1_Pooling", made["minilm"] / "1_Pooling")
    torch.manual_seed(0)
    if (minilm / "model.safetensors").exists():
        shutil.copy(minilm / "model.safetensors", made["minilm"] / "model.safetensors")
    else:
        config = transformers.BertConfig.from_pretrained(str(minilm))
        transformers.BertModel(config).save_pretrained(str(made["minilm"]))
        shutil.copy(minilm / "config.json", made["minilm"] / "config.json")
    bert = transformers.BertConfig()  # bert-base-uncased's shape
    bert.id2label, bert.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    if wanted is None or any(w.startswith("bert-base") for w in wanted):
        transformers.BertForSequenceClassification(bert).save_pretrained(str(made["bert-base"]))
    info: dict[str, Any] = {}
    for model, source in made.items():
        for runtime in GPU_RUNTIMES:
            name = f"{model}-{runtime}"
            if wanted is not None and name not in wanted:
                continue
            path, _ = import_model(source, model_dir / name, name, "1")
            config = json.loads((path / "config.json").read_text())
            config["text"]["max_length"] = 128
            config.update(GPU_OPTIONS)
            if runtime == "torch":
                config.update(precision="fp16", cuda_graphs=True)
            else:
                export_onnx(path, config, device)
                config.update(format="onnx", providers=["cuda"])
                config["text"]["tokenizer"] = "hf/tokenizer.json"
                config.pop("task", None)
            (path / "config.json").write_text(json.dumps(config, indent=2))
            info[name] = {
                "model": "all-MiniLM-L6-v2" if model == "minilm" else "BERT-base classifier",
                "weights": weights if model == "minilm" else "seeded random",
                "runtime": "torch fp16, CUDA graphs" if runtime == "torch"
                else "ONNX Runtime fp16, CUDA execution provider, IO binding",
            }  # fmt: skip
    return info


class _Float32(torch.nn.Module):
    """The module's output as float32 (what the config declares), inside the graph."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.module(input_ids, attention_mask, token_type_ids).float()


def export_onnx(path: Path, raw: dict[str, Any], device: torch.device) -> Path:
    """The version's Hugging Face module in fp16, exported to ``model.onnx`` with its batch
    and sequence dimensions dynamic."""
    import warnings

    from pipeline.models.config import ModelConfig
    from pipeline.models.formats.huggingface import load

    config = ModelConfig.from_json(raw)
    module = _Float32(load(config, path, device).half()).eval()
    names = [s.name for s in config.inputs]
    assert names == ["input_ids", "attention_mask", "token_type_ids"], names
    example = tuple(torch.ones((4, 16), dtype=torch.int64, device=device) for _ in names)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=512)
    out = path / "model.onnx"
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, example, str(out), input_names=names,
            # Taken in order (an op's output may already be called "embedding").
            output_names=[f"output_{i}" for i in range(len(config.outputs))],
            dynamic_shapes={n: {0: batch, 1: seq} for n in names}, dynamo=True,
            external_data=False, verbose=False,
        )  # fmt: skip
    return out
