"""The Quix Streams peer of `benchmarks.peers`: the demo model served one message at a time,
written as Quix Streams' documentation shows an application (its README and quickstart,
https://quix.io/docs/quix-streams/quickstart.html: ``Application(broker_address=...,
consumer_group=..., auto_offset_reset="earliest")``, ``app.topic(..., value_deserializer=
"json")``, ``sdf = app.dataframe(topic)``, ``sdf = sdf.apply(fn)``, ``sdf.to_topic(out)``,
``app.run()``).

It runs in its own virtualenv (`benchmarks.peers.quix_python`: Quix Streams pins an older
confluent-kafka than the project's), which sees the project's torch and numpy after its own
packages. The model is loaded as its user would load it: the module class it was trained
with, its weights file, ``torch.inference_mode`` for each call. Nothing here batches.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from quixstreams import Application

from pipeline.models.architectures import MLP


def load_model(model_dir: Path, name: str, version: str) -> torch.nn.Module:
    """The version's module: its architecture from ``config.json``, its weights file."""
    path = model_dir / name / version
    config = json.loads((path / "config.json").read_text())
    module = MLP(**config["arch_config"])
    if config["format"] == "safetensors":
        from safetensors.torch import load_file

        module.load_state_dict(load_file(str(path / "model.safetensors")))
    elif config["format"] == "state_dict":
        module.load_state_dict(torch.load(path / "model.pt", weights_only=True))
    else:
        raise ValueError(
            f"the peer loads safetensors or state_dict weights, not {config['format']}"
        )
    return module.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--requests-topic", required=True)
    parser.add_argument("--responses-topic", required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--version", required=True)
    args = parser.parse_args()

    # One thread: a 16-in, 32-hidden MLP on one row gains nothing from more, and the sluice
    # worker it is compared with computes on one too (SLUICE_TORCH_THREADS' default).
    torch.set_num_threads(1)
    model = load_model(args.model_dir, args.model, args.version)

    def infer(request: dict[str, Any]) -> dict[str, Any]:
        """One request in, its response out: the v2 protocol the bench's reader checks."""
        features = request["inputs"][0]["data"]
        with torch.inference_mode():
            logits = model(torch.tensor([features], dtype=torch.float32))[0].tolist()
        return {
            "id": request["id"],
            "status": "ok",
            "model": args.model,
            "model_version": args.version,
            "outputs": [
                {"name": "logits", "datatype": "FP32", "shape": [len(logits)], "data": logits}
            ],
        }

    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
    )
    requests = app.topic(args.requests_topic, value_deserializer="json")
    responses = app.topic(args.responses_topic, value_serializer="json")
    sdf = app.dataframe(requests)
    sdf = sdf.apply(infer)
    # The record's key (the request id) goes with it: the caller matches answers by key.
    sdf.to_topic(responses)
    app.run()


if __name__ == "__main__":
    main()
