"""``torch.export`` programs (``model.pt2``, saved with ``torch.export.save``), exported
with their batch (and sequence) dimensions declared dynamic."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.models.config import ModelConfig


def load(config: ModelConfig, path: Path, device: torch.device) -> nn.Module:
    program = torch.export.load(str(path / "model.pt2"))
    module = program.module()
    module.to(device)
    return module
