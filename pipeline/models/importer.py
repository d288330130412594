"""``sluice model import``: a model artifact into a version directory with its config.

The format is recognised from the artifact: an ONNX file (``.onnx``), a ``torch.export``
program (``.pt2``), a Hugging Face directory (``config.json`` beside its weights and
``tokenizer.json``) or a TorchScript file. Input and output names, datatypes and shapes are
read from the artifact (TorchScript records no shapes: they are given with ``--input``).
Text models (a tokenizer beside an ONNX graph that takes ``input_ids``; every Hugging Face
directory) take the ``text`` input; sentence-embedding directories answer ``embedding``,
classifiers ``logits`` with their ``labels`` and ``scores``.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

from pipeline.models.config import (
    TEXT_INPUTS,
    ModelConfig,
    ModelLoadError,
    TensorSpec,
    TextOptions,
)

# Files of a Hugging Face directory that serving reads (weights in safetensors).
_HF_SKIP = ("*.bin", "*.h5", "*.msgpack", "*.ot", "onnx", "openvino", "*.onnx", ".git*",
            "README.md", "data_config.json", "train_script.py")  # fmt: skip


def detect(path: Path) -> str:
    """The format of an artifact, or `ModelLoadError` saying what it is not."""
    if path.is_dir():
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            return "huggingface"
        raise ModelLoadError(f"{path}: a directory, but not a Hugging Face model (config.json "
                             "and safetensors weights)")  # fmt: skip
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist")
    if path.suffix == ".onnx":
        return "onnx"
    if path.suffix == ".pt2":
        return "export"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n.endswith("/constants.pkl") or n.endswith("/code/__torch__.py") for n in names):
            return "torchscript"
        if any("/models/" in n and n.endswith(".json") for n in names):
            return "export"
    raise ModelLoadError(f"{path}: not an ONNX file, a .pt2 program, a Hugging Face directory "
                         "or TorchScript")  # fmt: skip


def seq_buckets_for(max_length: int) -> tuple[int, ...]:
    """Powers of two from 16 up to ``max_length`` (which ends the list)."""
    buckets = [b for b in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if b < max_length]
    return (*buckets, max_length)


def import_model(
    source: Path,
    model_dir: Path,
    name: str,
    version: str | None = None,
    inputs: dict[str, tuple[str, tuple[int, ...]]] | None = None,
    force: bool = False,
) -> tuple[Path, ModelConfig]:
    """Copy ``source`` into ``<model_dir>/<name>/<version>`` and write its ``config.json``.

    ``version`` defaults to one past the newest integer version. ``inputs`` gives names'
    datatypes and per-example shapes (TorchScript, or to override what the artifact says).
    """
    source = Path(source)
    fmt = detect(source)
    if not name or "/" in name or name.startswith("."):
        raise ModelLoadError(f"model name must be a plain name, got {name!r}")
    base = Path(model_dir) / name
    if version is None:
        known = [int(p.name) for p in base.glob("*") if p.name.isdigit()] if base.is_dir() else []
        version = str(max(known, default=0) + 1)
    target = base / version
    if (target / "config.json").exists() and not force:
        raise ModelLoadError(f"{target} exists (pass --force to replace it)")
    config = _config(fmt, source, inputs or {})
    target.mkdir(parents=True, exist_ok=True)
    if fmt == "huggingface":
        shutil.rmtree(target / "hf", ignore_errors=True)
        shutil.copytree(source, target / "hf", ignore=shutil.ignore_patterns(*_HF_SKIP))
    else:
        artifact = {"onnx": "model.onnx", "export": "model.pt2", "torchscript": "model.ts"}[fmt]
        shutil.copyfile(source, target / artifact)
        # ONNX external weights, under their own name: the graph refers to them by it.
        for extra in source.parent.glob(source.name + ".data"):
            shutil.copyfile(extra, target / extra.name)
        if config.text is not None:
            shutil.copyfile(source.parent / "tokenizer.json", target / "tokenizer.json")
    (target / "config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")
    ModelConfig.read(target / "config.json")  # what the worker will read
    return target, config


def _config(fmt: str, source: Path, given: dict[str, tuple[str, tuple[int, ...]]]) -> ModelConfig:
    if fmt == "huggingface":
        return _huggingface(source)
    if fmt == "onnx":
        from pipeline.models.formats.onnx import describe

        ins, outs = describe(source)
    elif fmt == "export":
        ins, outs = _export_specs(source)
    else:
        ins, outs = _torchscript_specs(source, given)
    specs = [TensorSpec(n, *given.get(n, (d, tuple(s)))) for n, d, s in ins]
    outputs = tuple(TensorSpec(n, d, tuple(s)) for n, d, s in outs)
    names = [s.name for s in specs]
    text = None
    tokenizer = source.parent / "tokenizer.json"
    if "input_ids" in names and set(names) <= set(TEXT_INPUTS) and tokenizer.is_file():
        max_length = _tokenizer_max_length(tokenizer)
        text = TextOptions(max_length=max_length)
        specs = [TensorSpec(s.name, s.datatype, (-1,)) for s in specs]
    variable = any(-1 in s.shape for s in specs)
    max_length = text.max_length if text is not None else 512
    return ModelConfig(
        format=fmt,
        inputs=tuple(specs),
        outputs=outputs,
        text=text,
        seq_buckets=seq_buckets_for(max_length) if variable else (),
    )


def _huggingface(source: Path) -> ModelConfig:
    from pipeline.models.formats.huggingface import describe

    info = describe(source)
    max_length = int(info["max_length"])
    return ModelConfig(
        format="huggingface",
        task=info["task"],
        inputs=tuple(TensorSpec(n, "INT64", (-1,)) for n in info["inputs"]),
        outputs=tuple(TensorSpec(n, d, tuple(s)) for n, d, s in info["outputs"]),
        labels=tuple(info.get("labels", ())),
        text=TextOptions(max_length=max_length, tokenizer="hf/tokenizer.json"),
        seq_buckets=seq_buckets_for(max_length),
    )


def _tokenizer_max_length(file: Path) -> int:
    raw = json.loads(file.read_text())
    truncation = raw.get("truncation") or {}
    length = truncation.get("max_length")
    config = file.parent / "tokenizer_config.json"
    if not length and config.is_file():
        length = json.loads(config.read_text()).get("model_max_length")
    return int(length) if isinstance(length, int) and 0 < length < 100_000 else 512


_TORCH_DATATYPES = {
    "torch.float32": "FP32", "torch.float16": "FP16", "torch.float64": "FP64",
    "torch.int64": "INT64", "torch.int32": "INT32", "torch.int16": "INT16",
    "torch.int8": "INT8", "torch.uint8": "UINT8", "torch.bool": "BOOL", "torch.bfloat16": "FP32",
}  # fmt: skip


def _example_spec(name: str, value: Any) -> tuple[str, str, list[int]]:
    datatype = _TORCH_DATATYPES.get(str(value.dtype))
    if datatype is None:
        raise ModelLoadError(f"{name} has dtype {value.dtype}, not supported")
    dims = [d if isinstance(d, int) else -1 for d in value.shape]
    return name, datatype, dims[1:]


def _export_specs(source: Path) -> tuple[list[Any], list[Any]]:
    """A program's user inputs and outputs, from the fake tensors its graph records."""
    import torch

    program = torch.export.load(str(source))
    user_inputs = [
        s.arg.name for s in program.graph_signature.input_specs
        if s.kind == torch.export.graph_signature.InputKind.USER_INPUT
    ]  # fmt: skip
    nodes = {n.name: n for n in program.graph.nodes}
    ins = [_example_spec(n, nodes[n].meta["val"]) for n in user_inputs]
    output = next(n for n in program.graph.nodes if n.op == "output")
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    outs = [
        _example_spec("output" if len(values) == 1 else f"output_{i}", v.meta["val"])
        for i, v in enumerate(values)
    ]
    return ins, outs


def _torchscript_specs(
    source: Path, given: dict[str, tuple[str, tuple[int, ...]]]
) -> tuple[list[Any], list[Any]]:
    """Input names from the module's forward; shapes as given; outputs from one run."""
    import numpy as np
    import torch

    from pipeline.protocol.codec import DTYPES

    module = torch.jit.load(str(source), map_location="cpu")
    names = [a.name for a in module.forward.schema.arguments[1:]]
    missing = [n for n in names if n not in given]
    if missing:
        raise ModelLoadError(
            f"{source}: TorchScript records no shapes; give them with --input, e.g. "
            f"--input {missing[0]}:FP32:16 (inputs {names})"
        )
    example = [
        torch.from_numpy(np.zeros((2, *[d if d > 0 else 8 for d in given[n][1]]),
                                  dtype=DTYPES[given[n][0]]))
        for n in names
    ]  # fmt: skip
    with torch.inference_mode():
        out = module(*example)
    values = out if isinstance(out, (tuple, list)) else [out]
    outs = [
        _example_spec("output" if len(values) == 1 else f"output_{i}", v)
        for i, v in enumerate(values)
    ]
    return [(n, given[n][0], list(given[n][1])) for n in names], outs


def parse_input(option: str) -> tuple[str, tuple[str, tuple[int, ...]]]:
    """``NAME:DATATYPE:D1,D2`` (a dimension -1 for a variable length) from ``--input``."""
    parts = option.split(":")
    if len(parts) != 3:
        raise ValueError(f"--input takes NAME:DATATYPE:D1,D2, got {option!r}")
    name, datatype, dims = parts
    return name, (datatype, tuple(int(d) for d in dims.split(",") if d))


def example_request(name: str, config: ModelConfig) -> dict[str, Any]:
    """A request a producer could send to a model of this config."""
    tensors: list[dict[str, Any]] = []
    if config.text is not None:
        tensors.append({"name": config.text.input, "datatype": "BYTES", "shape": [1],
                        "data": ["sluice serves this sentence"]})  # fmt: skip
    elif config.image is not None:
        tensors.append({"name": config.image.input, "datatype": "BYTES", "shape": [1],
                        "data": "<base64 JPEG or PNG>"})  # fmt: skip
    elif config.fields:
        tensors += [{"name": f, "datatype": "FP64", "shape": [1], "data": [0.0]}
                    for f in config.fields]  # fmt: skip
    else:
        for spec in config.inputs:
            if spec.name == config.mask_input:
                continue
            shape = [d if d > 0 else 4 for d in spec.shape]
            count = 1
            for d in shape:
                count *= d
            value: Any = "text" if spec.datatype == "BYTES" else 0
            tensors.append({"name": spec.name, "datatype": spec.datatype, "shape": shape,
                            "data": [value] * count})  # fmt: skip
    return {"id": "req-1", "model": name, "inputs": tensors}
