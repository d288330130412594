"""Hugging Face directories (``config.json``, safetensors weights, tokenizer files), loaded
with transformers, offline: nothing is fetched from the hub.

- ``task: embedding``: a sentence-transformers directory's encoder, pooled as its
  ``modules.json`` and pooling config say (mean, CLS or max over the real tokens), L2
  normalised when its pipeline has a ``Normalize`` module. Output: ``embedding``.
- ``task: classification``: a sequence classifier; its ``logits``, with the labels of its
  ``id2label`` in the sluice config (answers carry top-k ``labels`` and ``scores``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.models.config import ModelConfig, ModelLoadError

# Never reach for the hub, whatever the environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass(frozen=True)
class Pooling:
    """How token states become one sentence vector (sentence-transformers' layout)."""

    mode: str = "mean"  # mean, cls, max
    normalize: bool = False
    max_length: int | None = None

    @classmethod
    def read(cls, path: Path) -> Pooling:
        """The pooling a sentence-transformers directory declares (mean, unnormalised, if it
        declares none)."""
        modules_file = path / "modules.json"
        if not modules_file.exists():
            return cls()
        modules = json.loads(modules_file.read_text())
        mode, normalize = "mean", False
        for m in modules:
            kind = str(m.get("type", ""))
            if kind.endswith("Pooling"):
                raw = json.loads((path / m.get("path", "") / "config.json").read_text())
                modes = [k for k in ("cls", "mean", "max") if raw.get(f"pooling_mode_{k}_token"
                         if k == "cls" else f"pooling_mode_{k}_tokens")]  # fmt: skip
                if len(modes) != 1:
                    raise ModelLoadError(f"{path}: pooling must be one of cls, mean or max, "
                                         f"got {raw}")  # fmt: skip
                mode = modes[0]
            elif kind.endswith("Normalize"):
                normalize = True
            elif not kind.endswith("Transformer"):
                raise ModelLoadError(f"{path}: sentence-transformers module {kind} is not "
                                     "supported (Transformer, Pooling, Normalize are)")  # fmt: skip
        bert = path / "sentence_bert_config.json"
        max_length = json.loads(bert.read_text()).get("max_seq_length") if bert.exists() else None
        return cls(mode, normalize, max_length)


class SentenceEmbedding(nn.Module):
    """An encoder's token states pooled into one (normalised) vector per text."""

    def __init__(self, encoder: nn.Module, pooling: Pooling, input_names: list[str]) -> None:
        super().__init__()
        self.encoder = encoder
        self.mode = pooling.mode
        self.normalize = pooling.normalize
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.input_names, inputs, strict=True))
        states = self.encoder(**kwargs).last_hidden_state
        mask = kwargs["attention_mask"].unsqueeze(-1).to(states.dtype)
        if self.mode == "cls":
            pooled = states[:, 0]
        elif self.mode == "max":
            pooled = states.masked_fill(mask == 0, torch.finfo(states.dtype).min).amax(dim=1)
        else:
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=1)
        return pooled


class SequenceClassifier(nn.Module):
    """A sequence classifier's logits."""

    def __init__(self, model: nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, inputs, strict=True))).logits


def load(config: ModelConfig, path: Path, device: torch.device) -> nn.Module:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    path = path / "hf"
    names = [s.name for s in config.inputs]
    kwargs: dict[str, Any] = {"local_files_only": True}
    if config.task == "embedding":
        encoder = transformers.AutoModel.from_pretrained(str(path), **kwargs)
        module: nn.Module = SentenceEmbedding(encoder, Pooling.read(path), names)
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)
        module = SequenceClassifier(model, names)
    module.to(device)
    module.eval()
    return module


def describe(path: Path) -> dict[str, Any]:
    """What `sluice model import` writes for a Hugging Face directory: task, inputs,
    outputs, labels and text options, read from its own files."""
    raw = json.loads((path / "config.json").read_text())
    tokenizer_config = path / "tokenizer_config.json"
    tok = json.loads(tokenizer_config.read_text()) if tokenizer_config.exists() else {}
    if not (path / "tokenizer.json").exists():
        raise ModelLoadError(f"{path}: no tokenizer.json (a fast tokenizer) beside the model")
    architectures = raw.get("architectures") or []
    if (path / "modules.json").exists():
        task = "embedding"
    elif any(a.endswith("ForSequenceClassification") for a in architectures):
        task = "classification"
    else:
        raise ModelLoadError(
            f"{path}: neither a sentence-transformers directory (modules.json) nor a sequence "
            f"classifier (architectures {architectures})"
        )
    pooling = Pooling.read(path)
    limits = [
        pooling.max_length,
        tok.get("model_max_length") if isinstance(tok.get("model_max_length"), int) else None,
        raw.get("max_position_embeddings"),
    ]
    max_length = min(x for x in limits if isinstance(x, int) and 0 < x < 1_000_000) if any(
        isinstance(x, int) and 0 < x < 1_000_000 for x in limits
    ) else 512  # fmt: skip
    names = list(tok.get("model_input_names") or ["input_ids", "token_type_ids", "attention_mask"])
    if raw.get("type_vocab_size", 2) < 1 or raw.get("model_type") in ("distilbert", "roberta"):
        names = [n for n in names if n != "token_type_ids"]
    order = ("input_ids", "attention_mask", "token_type_ids")
    names = [n for n in order if n in names]
    out: dict[str, Any] = {"task": task, "max_length": max_length, "inputs": names}
    if task == "embedding":
        out["outputs"] = [("embedding", "FP32", [int(raw["hidden_size"])])]
    else:
        id2label = raw.get("id2label") or {}
        labels = [str(id2label.get(str(i), id2label.get(i, i))) for i in range(len(id2label))]
        out["outputs"] = [("logits", "FP32", [len(labels)])]
        out["labels"] = labels
    return out
