"""Built-in architectures for the weights-only formats (safetensors, state_dict)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from pipeline.models import zoo

log = logging.getLogger(__name__)


class MLP(nn.Module):
    """A small multilayer perceptron classifier: the demo and test model."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConcatMLP(MLP):
    """An MLP over its inputs concatenated: e.g. a request's query and the features the
    gateway attached for its key (pipeline/features)."""

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.net(torch.cat(inputs, dim=-1))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "concat_mlp": ConcatMLP,
    "bert_encoder": zoo.BertEncoder,
    "resnet": zoo.ResNet,
}
