"""A model's ``config.json``: its format, tensors, how requests become its inputs (text,
images, records), batching and runtime options, checked with an error that names the bad
value."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.batching.scheduler import (
    check_buckets,
)
from pipeline.errors import SluiceError
from pipeline.models.architectures import ARCHITECTURES
from pipeline.models.runtime import (
    PRECISIONS,
)
from pipeline.protocol.codec import (
    DTYPES,
)

log = logging.getLogger(__name__)


class ModelLoadError(SluiceError, RuntimeError):
    """A model directory entry that cannot be loaded."""


# Each format and the artifact it reads from the version directory (None: nothing but the
# operator's handler class).
FORMATS: dict[str, str | None] = {
    "safetensors": "model.safetensors",
    "state_dict": "model.pt",
    "torchscript": "model.ts",
    "export": "model.pt2",
    "onnx": "model.onnx",
    "huggingface": "hf",  # the directory's files, under hf/ (its config.json is not ours)
    "handler": None,
}
TASKS = ("embedding", "classification")
# onnxruntime execution providers by the short names a config uses.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output; -1 in ``shape`` marks a variable (sequence) dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    pad: float = 0

    @property
    def variable_axis(self) -> int | None:
        return self.shape.index(-1) if -1 in self.shape else None


@dataclass(frozen=True)
class TextOptions:
    """Requests carry UTF-8 text in a BYTES tensor (``input``), tokenized a batch at a time
    by the model's fast tokenizer into its ``input_ids``/``attention_mask``/``token_type_ids``.

    A text longer than ``max_length`` tokens is cut there, and its answer says so; with
    ``truncation`` off it is refused (``text_too_long``).
    """

    max_length: int
    input: str = "text"
    truncation: bool = True
    tokenizer: str = "tokenizer.json"

    def __post_init__(self) -> None:
        _integer("text.max_length", self.max_length, 2)
        if not isinstance(self.truncation, bool):
            raise ValueError(f"text.truncation must be true or false, got {self.truncation!r}")


IMAGE_DECODERS = ("auto", "cpu", "nvjpeg", "nvjpeg-forked", "nvimgcodec")
# torch.compile modes (`compile` may also be true: the default mode).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class ImageOptions:
    """Requests carry JPEG or PNG bytes in a BYTES tensor (``input``), decoded to RGB and
    resized to ``size`` (height, width): ``stretch`` resizes to it, ``center_crop`` resizes
    the shorter side and crops the middle. A float model input gets ``(x / 255 - mean) /
    std``; a UINT8 one the pixels. ``layout`` is ``CHW`` or ``HWC``.

    ``decode`` says where: ``cpu`` (Pillow, on the worker's threads), ``nvjpeg`` (JPEGs in batches
    on the GPU through torchvision's nvJPEG, on its hardware JPEG engines where it has them),
    ``nvimgcodec`` (the same engines through nvImageCodec) or ``auto`` (the fastest this machine
    has: nvjpeg on CUDA where torchvision is installed, else nvimgcodec, else cpu).
    ``nvjpeg-forked`` is nvjpeg called on torch's own threads, which never wait for the
    interpreter, the batch finished and submitted on the engine's loop, the next one
    decoding while the model computes (`DeviceImageInputs.begin`; not yet measured in the
    pipeline in this form, see benchmarks/README.md, so ``auto`` does not pick it). The GPU
    paths resize and normalise on the GPU too; ``channels_last`` lays the batch (and the model)
    out NHWC in memory, which convolutions on tensor cores prefer."""

    size: tuple[int, int]
    input: str = "image"
    resize: str = "stretch"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: str = "CHW"
    max_pixels: int = 40_000_000
    decode: str = "auto"
    channels_last: bool = False

    def __post_init__(self) -> None:
        if len(self.size) != 2:
            raise ValueError(f"image.size must be [height, width], got {list(self.size)}")
        for d in self.size:
            _integer("image.size", d, 1)
        if self.resize not in ("stretch", "center_crop"):
            raise ValueError(f"image.resize must be stretch or center_crop, got {self.resize!r}")
        if self.layout not in ("CHW", "HWC"):
            raise ValueError(f"image.layout must be CHW or HWC, got {self.layout!r}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
                raise ValueError(f"image.{name} must be 3 numbers, got {list(v)}")
        if any(x <= 0 for x in self.std):
            raise ValueError(f"image.std must be > 0, got {list(self.std)}")
        _integer("image.max_pixels", self.max_pixels, 1)
        if self.decode not in IMAGE_DECODERS:
            raise ValueError(f"image.decode must be one of {list(IMAGE_DECODERS)}, got "
                             f"{self.decode!r}")  # fmt: skip
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"image.channels_last must be true or false, got "
                             f"{self.channels_last!r}")  # fmt: skip
        if self.channels_last and self.layout != "CHW":
            raise ValueError("image.channels_last applies to the CHW layout")

    @property
    def shape(self) -> tuple[int, int, int]:
        h, w = self.size
        return (3, h, w) if self.layout == "CHW" else (h, w, 3)


@dataclass(frozen=True)
class ModelConfig:
    """The contents of a version's ``config.json``."""

    format: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    arch: str | None = None
    arch_config: dict[str, Any] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    # huggingface: what the directory's model is for (embedding, classification).
    task: str | None = None
    # handler: the operator's class, "package.module:Class" (a module may be a .py file in
    # the version directory). Trusted code, named here; never from a message.
    handler: str | None = None
    # How requests become the model's inputs when they are not its tensors (one at most).
    text: TextOptions | None = None
    image: ImageOptions | None = None
    fields: tuple[str, ...] = ()  # records: named fields, in the feature vector's order
    # onnx: execution providers in preference order (cpu, cuda, tensorrt); default: cuda
    # then cpu on a GPU, cpu elsewhere.
    providers: tuple[str, ...] = ()
    # Runtime options (README "Model config"): all optional.
    precision: str = "fp32"
    compile: bool | str = False
    cuda_graphs: bool = False
    batch_buckets: tuple[int, ...] = ()
    seq_buckets: tuple[int, ...] = ()
    mask_input: str | None = None
    memory_budget_mb: float | None = None
    max_batch_size: int | None = None
    max_delay_ms: float | None = None
    time_budget_ms: float | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.compile, bool) and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be true, false or a mode among "
                             f"{list(COMPILE_MODES)}, got {self.compile!r}")  # fmt: skip
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be true or false, got {self.cuda_graphs!r}")
        if self.batch_buckets:
            object.__setattr__(
                self, "batch_buckets", check_buckets("batch_buckets", self.batch_buckets)
            )
        if self.seq_buckets:
            object.__setattr__(self, "seq_buckets", check_buckets("seq_buckets", self.seq_buckets))
        for s in self.inputs:
            if s.shape.count(-1) > 1:
                raise ValueError(f"input {s.name!r} may have one variable (-1) dimension, "
                                 f"got shape {list(s.shape)}")  # fmt: skip
            if s.variable_axis is not None and not self.seq_buckets:
                raise ValueError(
                    f"input {s.name!r} has a variable dimension: seq_buckets must be set"
                )
        self._check_preparation()
        if self.mask_input is not None:
            spec = next((s for s in self.inputs if s.name == self.mask_input), None)
            if spec is None or spec.shape != (-1,):
                raise ValueError(
                    f"mask_input must name an input of shape [-1], got {self.mask_input!r}"
                )
            if not any(s.variable_axis is not None for s in self.inputs if s is not spec):
                raise ValueError(f"mask_input {self.mask_input!r} needs a variable-length input")
        _positive("memory_budget_mb", self.memory_budget_mb)
        _positive("time_budget_ms", self.time_budget_ms)
        _positive("max_delay_ms", self.max_delay_ms, zero_ok=True)
        n = self.max_batch_size
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"max_batch_size must be an integer >= 1, got {n!r}")

    def _check_preparation(self) -> None:
        """Text, image and record inputs: one kind at most, over model inputs that fit it."""
        kinds = [k for k in ("text", "image", "fields") if getattr(self, k)]
        if len(kinds) > 1:
            raise ValueError(f"a model takes one of text, image or fields, got {kinds}")
        names = [s.name for s in self.inputs]
        if self.text is not None:
            bad = [n for n in names if n not in TEXT_INPUTS]
            if bad or "input_ids" not in names:
                raise ValueError(
                    f"a text model's inputs are input_ids and optionally attention_mask and "
                    f"token_type_ids (filled by its tokenizer), got {names}"
                )
            for s in self.inputs:
                if s.shape != (-1,) or DTYPES[s.datatype] not in _INTEGERS:
                    raise ValueError(f"text input {s.name!r} must be an integer tensor of "
                                     f"shape [-1], got {s.datatype} {list(s.shape)}")  # fmt: skip
            if self.seq_buckets and self.seq_buckets[-1] > self.text.max_length:
                raise ValueError(
                    f"seq_buckets go past text.max_length {self.text.max_length}: "
                    f"{list(self.seq_buckets)}"
                )
        if self.image is not None:
            if len(self.inputs) != 1 or self.inputs[0].shape != self.image.shape:
                raise ValueError(
                    f"an image model takes one input of shape {list(self.image.shape)} "
                    f"(image.size, image.layout), got {[list(s.shape) for s in self.inputs]}"
                )
            if self.inputs[0].datatype not in ("FP32", "FP16", "UINT8"):
                raise ValueError(
                    f"an image model's input must be FP32, FP16 or UINT8, got "
                    f"{self.inputs[0].datatype}"
                )
        if self.fields:
            if len(set(self.fields)) != len(self.fields) or not all(
                isinstance(f, str) and f for f in self.fields
            ):
                raise ValueError(f"fields must be distinct names, got {list(self.fields)}")
            if len(self.inputs) != 1 or self.inputs[0].shape != (len(self.fields),):
                raise ValueError(
                    f"a record model takes one input of shape [{len(self.fields)}] (its fields),"
                    f" got {[list(s.shape) for s in self.inputs]}"
                )
        for p in self.providers:
            if p not in PROVIDERS:
                raise ValueError(f"providers must be among {list(PROVIDERS)}, got {p!r}")

    @classmethod
    def read(cls, path: Path) -> ModelConfig:
        try:
            raw = json.loads(path.read_text())
            cfg = cls.from_json(raw)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{path}: invalid model config ({exc})") from exc
        problem = cfg.format_problem()
        if problem:
            raise ModelLoadError(f"{path}: {problem}")
        return cfg

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ModelConfig:
        text, image = raw.get("text"), raw.get("image")
        return cls(
            format=raw["format"],
            inputs=tuple(_spec(s) for s in raw["inputs"]),
            outputs=tuple(_spec(s) for s in raw["outputs"]),
            arch=raw.get("arch"),
            arch_config=dict(raw.get("arch_config", {})),
            labels=tuple(raw.get("labels", ())),
            task=raw.get("task"),
            handler=raw.get("handler"),
            text=TextOptions(**text) if text is not None else None,
            image=_image(image) if image is not None else None,
            fields=tuple(raw.get("fields", ())),
            providers=tuple(raw.get("providers", ())),
            **{k: _option(k, raw[k]) for k in _OPTIONS if k in raw},
        )

    def format_problem(self) -> str | None:
        """What the format needs that the config lacks, or None."""
        if self.format not in FORMATS:
            return f"format must be one of {list(FORMATS)}, got {self.format!r}"
        if self.format in ("safetensors", "state_dict") and self.arch not in ARCHITECTURES:
            return f"arch must be one of {list(ARCHITECTURES)}, got {self.arch!r}"
        if self.format == "huggingface" and self.task not in TASKS:
            return f"task must be one of {list(TASKS)}, got {self.task!r}"
        if self.format == "handler" and (
            not isinstance(self.handler, str) or ":" not in self.handler
        ):
            return f'handler must name a class as "module:Class", got {self.handler!r}'
        if self.providers and self.format != "onnx":
            return "providers apply to the onnx format only"
        return None

    def to_json(self) -> dict[str, Any]:
        def spec(s: TensorSpec) -> dict[str, Any]:
            out = {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
            return {**out, "pad": s.pad} if s.pad else out

        out: dict[str, Any] = {
            "format": self.format,
            "inputs": [spec(s) for s in self.inputs],
            "outputs": [spec(s) for s in self.outputs],
        }
        if self.arch:
            out["arch"] = self.arch
            out["arch_config"] = self.arch_config
        if self.labels:
            out["labels"] = list(self.labels)
        for name in ("task", "handler"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.text is not None:
            out["text"] = asdict(self.text)
        if self.image is not None:
            out["image"] = {k: list(v) if isinstance(v, tuple) else v
                            for k, v in asdict(self.image).items()}  # fmt: skip
        if self.fields:
            out["fields"] = list(self.fields)
        if self.providers:
            out["providers"] = list(self.providers)
        for name in _OPTIONS:
            value = getattr(self, name)
            if value != _OPTION_DEFAULTS[name]:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out


_OPTIONS = (
    "precision", "compile", "cuda_graphs", "batch_buckets", "seq_buckets", "mask_input",
    "memory_budget_mb", "max_batch_size", "max_delay_ms", "time_budget_ms",
)  # fmt: skip
_OPTION_DEFAULTS = {
    "precision": "fp32", "compile": False, "cuda_graphs": False, "batch_buckets": (),
    "seq_buckets": (), "mask_input": None, "memory_budget_mb": None, "max_batch_size": None,
    "max_delay_ms": None, "time_budget_ms": None,
}  # fmt: skip


_INTEGERS = (np.int32, np.int64)


def _image(raw: dict[str, Any]) -> ImageOptions:
    raw = dict(raw)
    for k in ("size", "mean", "std"):
        if k in raw:
            if not isinstance(raw[k], list):
                raise ValueError(f"image.{k} must be a list, got {raw[k]!r}")
            raw[k] = tuple(raw[k])
    return ImageOptions(**raw)


def _integer(name: str, value: Any, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def _option(name: str, value: Any) -> Any:
    if name in ("batch_buckets", "seq_buckets"):
        if not isinstance(value, list):
            raise ValueError(f"{name} must be a list of integers, got {value!r}")
        return tuple(value)
    return value


def _positive(name: str, value: Any, zero_ok: bool = False) -> None:
    if value is None:
        return
    bad = not isinstance(value, (int, float)) or isinstance(value, bool)
    if bad or value < 0 or (value == 0 and not zero_ok) or not math.isfinite(value):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{name} must be a number {bound}, got {value!r}")


def _spec(raw: dict[str, Any]) -> TensorSpec:
    if raw["datatype"] not in DTYPES:
        raise ValueError(f"unknown datatype {raw['datatype']!r}")
    shape = tuple(int(d) for d in raw["shape"])
    if any(d < 1 and d != -1 for d in shape):
        raise ValueError(f"shape of {raw['name']!r} must hold sizes >= 1 or -1, got {list(shape)}")
    pad = raw.get("pad", 0)
    if not isinstance(pad, (int, float)) or isinstance(pad, bool):
        raise ValueError(f"pad of {raw['name']!r} must be a number, got {pad!r}")
    return TensorSpec(str(raw["name"]), str(raw["datatype"]), shape, pad)
