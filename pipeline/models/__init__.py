"""Models: config (`config`), built-in architectures (`architectures`), one loader per
format (`formats`: builtin, export, onnx, huggingface, handler), inputs and how requests
become them (`inputs`; `text`, `images`, `records`), a model on its device (`loaded`), the
device runtime (`runtime`), the versioned registry (`registry`), `sluice model import`
(`importer`), the demo models (`demo`) and the GPU bench's architectures (`zoo`)."""

from pipeline.models.architectures import ARCHITECTURES, MLP, ConcatMLP
from pipeline.models.config import FORMATS, ModelConfig, ModelLoadError, TensorSpec
from pipeline.models.demo import (
    DEMO_FEATURES,
    DEMO_LABELS,
    DEMO_TEXTS,
    demo_config,
    init_demo,
    init_minilm,
    save_model,
)
from pipeline.models.formats import Handler
from pipeline.models.loaded import HostBatch, LoadedModel, pick_device
from pipeline.models.registry import ModelRegistry

__all__ = [
    "ARCHITECTURES",
    "DEMO_FEATURES",
    "DEMO_LABELS",
    "DEMO_TEXTS",
    "FORMATS",
    "Handler",
    "MLP",
    "ConcatMLP",
    "HostBatch",
    "LoadedModel",
    "ModelConfig",
    "ModelLoadError",
    "ModelRegistry",
    "TensorSpec",
    "demo_config",
    "init_demo",
    "init_minilm",
    "pick_device",
    "save_model",
]
