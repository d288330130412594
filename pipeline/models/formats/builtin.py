"""Built-in architectures with safetensors or state-dict weights, and TorchScript."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.models.architectures import ARCHITECTURES
from pipeline.models.config import FORMATS, ModelConfig


def load(config: ModelConfig, path: Path, device: torch.device) -> nn.Module:
    weights = path / str(FORMATS[config.format])
    if config.format == "torchscript":
        module = torch.jit.load(str(weights), map_location=device)
    else:
        assert config.arch is not None
        module = ARCHITECTURES[config.arch](**config.arch_config)
        if config.format == "safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights), device="cpu")
        else:
            # weights_only: a state dict never runs pickled code.
            state = torch.load(weights, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
        module.to(device)
    module.eval()
    return module
