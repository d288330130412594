"""``python -m benchmarks.bench_paths``: each model path a config can name, bare, on this GPU.

For ResNet-50 (224×224, normalised FP16 input, channels-last: `benchmarks.bench_jpeg`'s
model) and BERT-base (128 tokens), at one batch size (``--batch``), each loaded through the
registry as a user's model with one batch bucket and timed on device-resident batches
(`benchmarks.bench_gpu.bare_rps`):

- ``eager``: FP16 kernels replayed through CUDA graphs (``cuda_graphs``);
- ``compile``: ``torch.compile`` (mode default) inside the same graphs;
- ``max-autotune``: ``torch.compile`` mode max-autotune (its kernels chosen by timing them)
  inside the same graphs;
- ``onnx-cuda`` / ``onnx-tensorrt``: the model exported to ONNX (FP16 weights) and run by
  onnxruntime's CUDA or TensorRT execution provider, where this onnxruntime has it (else the
  reason it is missing).

``load_s`` is what loading takes (compiling and warming up its bucket). The last stdout line
is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks import bench_gpu, bench_jpeg
from pipeline.models import ModelRegistry

PATHS: dict[str, bool | str] = {"eager": False, "compile": "default",
                                "max-autotune": "max-autotune"}  # fmt: skip


def run(batch: int, seconds: float, paths: list[str]) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = bench_jpeg.GPU if device.type == "cuda" else bench_jpeg.CPU
    result: dict[str, Any] = {
        "scenario": "paths",
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "batch": batch,
        "models": {"bert": {}, "resnet": {}},
    }
    for path in paths:
        if path.startswith("onnx"):
            continue
        precision = "fp16" if device.type == "cuda" else "fp32"
        scale = dataclasses.replace(
            base, batch=batch, model_batch={}, compile=PATHS[path], precision=precision
        )
        with tempfile.TemporaryDirectory(prefix="sluice-paths-") as tmp:
            names = bench_gpu.build_models(Path(tmp), scale, device, buckets=(batch,))
            registry = ModelRegistry(Path(tmp), device)
            for name in names:
                t0 = time.perf_counter()
                try:
                    registry.resolve(name)
                except Exception as exc:  # noqa: BLE001 - a path this machine cannot take
                    result["models"][name][path] = f"failed: {type(exc).__name__}: {exc}"
                    continue
                load_s = round(time.perf_counter() - t0, 1)
                rps = bench_gpu.bare_rps(registry, name, batch, seconds)
                result["models"][name][path] = {"bare_rps": round(rps, 1), "load_s": load_s}
                # Each figure as it comes: a run cut short still says how far it got.
                sys.stderr.write(f"{name} {path}: {result['models'][name][path]}\n")
            del registry
            if device.type == "cuda":
                torch.cuda.empty_cache()
    onnx = [p for p in paths if p.startswith("onnx")]
    if onnx:
        for name, figures in _onnx(base, batch, seconds, device, onnx).items():
            result["models"][name].update(figures)
    return result


def _onnx(
    base: bench_gpu.Scale, batch: int, seconds: float, device: torch.device, paths: list[str]
) -> dict[str, dict[str, Any]]:
    """Each model exported to ONNX and run by each execution provider asked for."""
    out: dict[str, dict[str, Any]] = {"bert": {}, "resnet": {}}
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return {name: {p: f"unavailable: {exc}" for p in paths} for name in out}
    available = ort.get_available_providers()
    scale = dataclasses.replace(base, batch=batch, model_batch={}, precision="fp32")
    with tempfile.TemporaryDirectory(prefix="sluice-paths-onnx-") as tmp:
        names = bench_gpu.build_models(Path(tmp), scale, device, buckets=(batch,))
        registry = ModelRegistry(Path(tmp), device)
        for name in names:
            loaded = registry.resolve(name)
            version = Path(tmp) / name / "1"
            try:
                _export(loaded, version, batch, device)
            except Exception as exc:  # noqa: BLE001 - say why
                out[name] = {p: f"export failed: {type(exc).__name__}: {exc}" for p in paths}
                continue
            for path in paths:
                provider = path.removeprefix("onnx-")
                if f"{provider.capitalize()}ExecutionProvider".lower() not in [
                    a.lower() for a in available
                ]:
                    out[name][path] = f"unavailable: onnxruntime here has {available}"
                    continue
                out[name][path] = _onnx_rps(Path(tmp), name, version, provider, batch, seconds,
                                            device)  # fmt: skip
        del registry
    return out


def _export(loaded: Any, version: Path, batch: int, device: torch.device) -> None:
    """The loaded FP32 module exported, FP16 on the GPU, beside a copy of its version."""
    import onnx  # noqa: F401 - torch.onnx.export needs it

    spec = loaded.config.inputs[0]
    shape = (batch, *spec.shape)
    if spec.datatype.startswith("FP"):
        example = torch.randn(shape, device=device)
    else:
        vocab = int(loaded.config.arch_config.get("vocab_size", 100))
        example = torch.randint(0, vocab, shape, device=device, dtype=torch.int32)
    module = loaded.module
    if device.type == "cuda":
        module = module.half()
        example = example.half() if example.is_floating_point() else example
    onnx_dir = version.parent / "2"
    shutil.copytree(version, onnx_dir)
    with warnings.catch_warnings():  # the TorchScript-based exporter is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        axes = {spec.name: {0: "batch"}, "logits": {0: "batch"}}
        torch.onnx.export(module, (example,), str(onnx_dir / "model.onnx"), input_names=[spec.name],
                          output_names=["logits"], dynamo=False, opset_version=17,
                          dynamic_axes=axes)  # fmt: skip
    raw = json.loads((onnx_dir / "config.json").read_text())
    for key in ("arch", "arch_config", "precision", "cuda_graphs", "compile"):
        raw.pop(key, None)
    raw["format"] = "onnx"
    if device.type == "cuda" and spec.datatype.startswith("FP"):
        raw["inputs"][0]["datatype"] = "FP16"
    (onnx_dir / "config.json").write_text(json.dumps(raw))
    for f in onnx_dir.glob("*.safetensors"):
        f.unlink()


def _onnx_rps(
    root: Path, name: str, version: Path, provider: str, batch: int, seconds: float,
    device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    raw = json.loads((version.parent / "2" / "config.json").read_text())
    raw["providers"] = [provider]
    (version.parent / "2" / "config.json").write_text(json.dumps(raw))
    registry = ModelRegistry(root, device)
    t0 = time.perf_counter()
    try:
        registry.resolve(name, "2")
    except Exception as exc:  # noqa: BLE001 - say why
        return {"failed": f"{type(exc).__name__}: {exc}"}
    load_s = round(time.perf_counter() - t0, 1)
    loaded = registry.resolve(name, "2")
    args = [
        torch.zeros((batch, *s.shape), device=device,
                    dtype=torch.float16 if s.datatype == "FP16" else torch.int32)
        for s in loaded.config.inputs
    ]  # fmt: skip
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rps = bench_gpu.examples_per_s(lambda: loaded.module(*args), batch, seconds, sync)
    return {"bare_rps": round(rps, 1), "load_s": load_s}


def main() -> None:
    parser = argparse.ArgumentParser(description="Each model path, bare, on this machine.")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument(
        "--paths", default="eager,compile,max-autotune,onnx-cuda,onnx-tensorrt",
        help="comma-separated: eager, compile, max-autotune, onnx-cuda, onnx-tensorrt",
    )  # fmt: skip
    args = parser.parse_args()
    print(json.dumps(run(args.batch, args.seconds, args.paths.split(","))))


if __name__ == "__main__":
    main()
