"""Several models in one worker through a real broker: the demo classifier, a model with a
variable-length sequence input (padded to buckets, with an attention mask), and a model over
its memory budget, refused alone while the others serve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.client import Client
from pipeline.kafka import ensure_topics, pipeline_topics
from pipeline.models import (
    MLP,
    ModelConfig,
    ModelRegistry,
    TensorSpec,
    init_demo,
    save_model,
)
from pipeline.protocol import codec
from tests.integration.conftest import demo_request, make_settings

# torch 2.10+ deprecates torch.jit (script, save) with a FutureWarning; TorchScript is still a
# supported model format, and the worker process loads it without an architecture.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")


class SeqStats(nn.Module):
    """Per sequence: the sum and the largest of its ids, and its length, from the mask."""

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(torch.float32)
        x = ids.to(torch.float32) * m
        return torch.stack([x.sum(1), x.max(1).values, m.sum(1)], 1)


def build_models(model_dir: Path) -> None:
    init_demo(model_dir)
    seq = ModelConfig(
        format="torchscript",
        inputs=(TensorSpec("ids", "INT64", (-1,), pad=-7), TensorSpec("mask", "INT64", (-1,))),
        outputs=(TensorSpec("stats", "FP32", (3,)),),
        mask_input="mask",
        seq_buckets=(4, 16, 64),
        batch_buckets=(1, 4, 16),
        max_delay_ms=5.0,
    )
    save_model(model_dir, "seq", "1", SeqStats(), seq)
    torch.manual_seed(0)
    big = ModelConfig(
        format="safetensors",
        inputs=(TensorSpec("features", "FP32", (16,)),),
        outputs=(TensorSpec("logits", "FP32", (4,)),),
        arch="mlp",
        arch_config={"in_features": 16, "hidden": [256], "out_features": 4},
        memory_budget_mb=0.01,
    )
    save_model(model_dir, "big", "1", MLP(16, [256], 4), big)


@pytest.mark.parametrize("mode", ["fused", "split"])
def test_two_models_and_a_refused_one_in_one_worker(
    bootstrap: str, tmp_path: Path, start_workers, mode: str
) -> None:
    model_dir = tmp_path / "models"
    build_models(model_dir)
    assert json.loads((model_dir / "seq" / "1" / "config.json").read_text())["mask_input"]
    settings = make_settings(bootstrap, model_dir)
    ensure_topics(settings, pipeline_topics(settings, ["big", "demo", "seq"]))
    rng = np.random.default_rng(1)
    sequences = [rng.integers(1, 1000, int(n)).tolist() for n in rng.integers(1, 65, 40)]
    features = rng.standard_normal((40, 16)).astype(np.float32)
    with Client(settings) as client:
        workers = start_workers(settings, mode)
        workers.wait_ready(client)
        futures = {}
        for i, ids in enumerate(sequences):
            request = {
                "id": f"s{i}",
                "model": "seq",
                "inputs": [{"name": "ids", "datatype": "INT64", "shape": [len(ids)], "data": ids}],
            }
            futures[f"s{i}"] = client.submit(request)
            futures[f"d{i}"] = client.submit(demo_request(f"d{i}", features[i].tolist()))
        futures["big"] = client.submit({**demo_request("big"), "model": "big"})
        client.flush()
        responses = {rid: f.result(timeout=60) for rid, f in futures.items()}
    assert workers.alive(), workers.logs()

    for i, ids in enumerate(sequences):
        r = responses[f"s{i}"]
        assert r.status == "ok", r.error
        [stats] = r.outputs
        assert stats.name == "stats"
        np.testing.assert_allclose(codec.tensor_values(stats), [sum(ids), max(ids), len(ids)])
    expected = ModelRegistry(model_dir, device=torch.device("cpu")).resolve("demo").run([features])
    for i in range(40):
        r = responses[f"d{i}"]
        assert r.status == "ok", r.error
        np.testing.assert_allclose(
            codec.tensor_values(r.outputs[0]), expected[0][i], rtol=1e-4, atol=1e-5
        )
    refused = responses["big"]
    assert refused.status == "error" and refused.error is not None
    assert refused.error.code == "model_error"
    assert "over its memory_budget_mb 0.01" in refused.error.message
