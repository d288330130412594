"""One loader per weights format: the module a model's config and directory describe."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from pipeline.models.architectures import ARCHITECTURES
from pipeline.models.config import FORMATS, ModelConfig, ModelLoadError

log = logging.getLogger(__name__)


def load_module(config: ModelConfig, path: Path, device: torch.device) -> nn.Module:
    weights = path / FORMATS[config.format]
    if not weights.exists():
        raise ModelLoadError(f"{weights} is missing")
    try:
        if config.format == "torchscript":
            module = torch.jit.load(str(weights), map_location=device)
        else:
            assert config.arch is not None
            module = ARCHITECTURES[config.arch](**config.arch_config)
            if config.format == "safetensors":
                from safetensors.torch import load_file

                state = load_file(str(weights), device="cpu")
            else:
                state = torch.load(weights, map_location="cpu", weights_only=True)
            module.load_state_dict(state)
            module.to(device)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{weights}: {exc}") from exc
    module.eval()
    return module
