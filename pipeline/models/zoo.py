"""Reference architectures for the GPU benchmark: a BERT-base-like encoder and ResNet-50.

Built in code with random weights, saved and loaded through the model registry like any
user's model (safetensors + ``arch``), never fetched from the internet. Both take compact
payloads, so that Kafka carries a few hundred bytes per request and the GPU does the rest:

- ``bert``: token ids (INT32, ``[seq]``), with an optional attention mask; classification
  logits from the first token, as BERT's pooler does.
- ``resnet``: a small uint8 image (``[3, s, s]``, e.g. 32x32 = 3 KB) that the model scales
  to its working resolution (224) on the GPU. A full 224x224 image is 150 KB: at the 14k
  images/s an H100 sustains, that is 2 GB/s through one broker, which measures the broker,
  not the pipeline. The resize is part of the model, so the bare-model figure counts it too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

BERT_BASE = {
    "vocab_size": 30522,
    "hidden": 768,
    "layers": 12,
    "heads": 12,
    "intermediate": 3072,
    "max_positions": 512,
    "num_labels": 2,
}
RESNET50 = {"layers": [3, 4, 6, 3], "width": 64, "num_classes": 1000, "image_size": 224}


class BertEncoder(nn.Module):
    """Token + position embeddings, post-norm transformer layers, a tanh pooler, logits."""

    def __init__(
        self,
        vocab_size: int,
        hidden: int,
        layers: int,
        heads: int,
        intermediate: int,
        max_positions: int,
        num_labels: int,
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, hidden)
        self.positions = nn.Embedding(max_positions, hidden)
        self.norm = nn.LayerNorm(hidden)
        layer = nn.TransformerEncoderLayer(
            hidden, heads, intermediate, dropout=0.0, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        ids = input_ids.long()
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.norm(self.tokens(ids) + self.positions(positions))
        padding = None if attention_mask is None else attention_mask == 0
        x = self.encoder(x, src_key_padding_mask=padding)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return self.classifier(pooled).float()


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * 4
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.down: nn.Module | None = None
        if stride != 1 or in_channels != out:
            self.down = nn.Sequential(
                nn.Conv2d(in_channels, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + identity)


class ResNet(nn.Module):
    """ResNet-50's layout (bottleneck blocks) over uint8 images resized on the device, or
    (``normalized_input``) over images already resized and normalised, as torchvision's
    ResNet-50 takes them."""

    def __init__(
        self,
        layers: Sequence[int],
        width: int,
        num_classes: int,
        image_size: int,
        normalized_input: bool = False,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.normalized_input = normalized_input
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, 2, 3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks: list[nn.Module] = []
        channels = width
        for i, count in enumerate(layers):
            stage_width = width * 2**i
            for j in range(count):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(Bottleneck(channels, stage_width, stride))
                channels = stage_width * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255)
        # Convolutions run fastest in NHWC on tensor cores; load_state_dict and half()
        # keep the parameters' layout.
        self.to(memory_format=torch.channels_last)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.normalized_input:
            x = image.to(self.fc.weight.dtype)
            return self._classify(x.contiguous(memory_format=torch.channels_last))
        x = (image.to(self.fc.weight.dtype) - self.mean) / self.std
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self._classify(x.contiguous(memory_format=torch.channels_last))

    def _classify(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)).float()


@torch.no_grad()
def calibrate_batch_norm(model: nn.Module, images: torch.Tensor) -> None:
    """Set batch-norm statistics from a batch of inputs, so random weights give activations
    of ordinary size (FP16 overflows on ResNet-50's random-init residual sums otherwise)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batches
    model.train()
    model(images)
    model.eval()
