"""Models: config (`config`), built-in architectures (`architectures`), one loader per
weights format (`loaders`), a model on its device (`loaded`: inputs, host batches,
submission), the device runtime (`runtime`), the versioned registry (`registry`), the demo
model (`demo`) and the GPU bench's architectures (`zoo`)."""

from pipeline.models.architectures import ARCHITECTURES, MLP, ConcatMLP
from pipeline.models.config import FORMATS, ModelConfig, ModelLoadError, TensorSpec
from pipeline.models.demo import DEMO_FEATURES, DEMO_LABELS, demo_config, init_demo, save_model
from pipeline.models.loaded import HostBatch, LoadedModel, pick_device
from pipeline.models.registry import ModelRegistry

__all__ = [
    "ARCHITECTURES",
    "DEMO_FEATURES",
    "DEMO_LABELS",
    "FORMATS",
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
    "pick_device",
    "save_model",
]
