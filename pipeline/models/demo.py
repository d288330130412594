"""The demo model: a small classifier over 16 features, saved in each weights format."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from pipeline.models.architectures import MLP
from pipeline.models.config import FORMATS, ModelConfig, TensorSpec

log = logging.getLogger(__name__)


DEMO_LABELS = ("north", "east", "south", "west")
DEMO_FEATURES = 16


def save_model(
    model_dir: Path, name: str, version: str, module: nn.Module, config: ModelConfig
) -> Path:
    """Save a module in the config's format under ``<model_dir>/<name>/<version>``."""
    path = Path(model_dir) / name / version
    path.mkdir(parents=True, exist_ok=True)
    weights = path / str(FORMATS[config.format])
    if config.format == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(weights))
    elif config.format == "state_dict":
        torch.save(module.state_dict(), weights)
    else:
        torch.jit.save(torch.jit.script(module), str(weights))
    (path / "config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")
    return path


def demo_config(fmt: str = "safetensors") -> ModelConfig:
    return ModelConfig(
        format=fmt,
        inputs=(TensorSpec("features", "FP32", (DEMO_FEATURES,)),),
        outputs=(TensorSpec("logits", "FP32", (len(DEMO_LABELS),)),),
        arch="mlp",
        arch_config={
            "in_features": DEMO_FEATURES,
            "hidden": [32],
            "out_features": len(DEMO_LABELS),
        },
        labels=DEMO_LABELS,
    )


def init_demo(model_dir: Path, name: str = "demo", force: bool = False) -> list[Path]:
    """Build the demo classifier: version 1 as safetensors, version 2 as a state dict."""
    paths = []
    for version, fmt, seed in (("1", "safetensors", 1), ("2", "state_dict", 2)):
        path = Path(model_dir) / name / version
        if (path / "config.json").exists() and not force:
            paths.append(path)
            continue
        torch.manual_seed(seed)
        cfg = demo_config(fmt)
        paths.append(save_model(model_dir, name, version, MLP(**cfg.arch_config), cfg))
    return paths
