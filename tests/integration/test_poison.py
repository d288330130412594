"""A request that makes the model raise fails alone: its batch neighbours are answered."""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline import codec
from pipeline.client import Client
from pipeline.kafka import ensure_topics, pipeline_topics
from pipeline.models import ModelConfig, TensorSpec, init_demo, save_model
from tests.integration.conftest import make_settings
from tests.integration.topic_reader import TopicReader

POISON = 666.0
NEIGHBOURS = 50


class PoisonModel(torch.nn.Module):
    """``2x + 1``, except that any input holding 666 makes forward raise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x == 666.0).any()):
            raise ValueError("poison input")
        return x * 2.0 + 1.0


def _request(request_id: str, values: list[float]) -> bytes:
    tensor = {"name": "x", "datatype": "FP32", "shape": [4], "data": values}
    return json.dumps({"id": request_id, "model": "poison", "inputs": [tensor]}).encode()


# torch 2.10+ deprecates torch.jit with a FutureWarning; the torchscript format still works.
@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")
def test_poison_request_fails_alone_in_its_batch(
    bootstrap: str, tmp_path: Path, start_workers
) -> None:
    model_dir = tmp_path / "models"
    init_demo(model_dir)  # the readiness probes ask the demo model
    config = ModelConfig(
        format="torchscript",
        inputs=(TensorSpec("x", "FP32", (4,)),),
        outputs=(TensorSpec("y", "FP32", (4,)),),
    )
    save_model(model_dir, "poison", "1", PoisonModel(), config)
    # One partition and a wide window: each round's 51 requests are consumed as one batch.
    settings = make_settings(bootstrap, model_dir, partitions=1, max_delay_s=1.0)
    ensure_topics(settings, pipeline_topics(settings, ["demo", "poison"]))
    sent: dict[str, bytes] = {}
    with Client(settings) as client:
        workers = start_workers(settings, "fused")
        workers.wait_ready(client)
        for round_, position in enumerate((0, NEIGHBOURS // 2, NEIGHBOURS)):
            futures = {}
            for i in range(NEIGHBOURS + 1):
                request_id = f"r{round_}-{i}"
                values = [float(i), 1.0, -2.5, POISON if i == position else 3.0]
                sent[request_id] = _request(request_id, values)
                futures[request_id] = (client.submit_raw(request_id, sent[request_id]), values)
            client.flush()
            sizes: Counter[int] = Counter()
            for request_id, (future, values) in futures.items():
                response = future.result(timeout=60)
                assert response.id == request_id
                if request_id == f"r{round_}-{position}":
                    assert response.status == "error", response
                    assert response.error is not None
                    assert response.error.code == codec.MODEL_ERROR
                    assert "poison input" in response.error.message
                    continue
                assert response.status == "ok", response
                assert response.outputs is not None and response.outputs[0].name == "y"
                assert response.outputs[0].data == [2.0 * v + 1.0 for v in values]
                assert response.timings is not None
                sizes[response.timings.batch_size] += 1
            # The neighbours ran in batches (a failing batch is split, not run one by one),
            # and each batch size s accounts for a whole number of batches of s requests.
            assert sum(sizes.values()) == NEIGHBOURS
            assert max(sizes) >= NEIGHBOURS // 4, sizes
            assert all(count % size == 0 for size, count in sizes.items()), sizes
            print(f"round {round_}: poison at {position}, neighbour batch sizes {dict(sizes)}")
        assert workers.alive(), workers.logs()

    with TopicReader(settings, settings.dlq_topic) as reader:
        reader.read_until(lambda: len(reader.records) >= 3, 60)
        dlq = [codec.decode_dlq(r.value or b"") for r in reader.records]
    assert sorted(r.request_id or "" for r in dlq) == ["r0-0", "r1-25", "r2-50"]
    for record in dlq:
        assert record.reason == codec.MODEL_ERROR and record.model == "poison"
        assert record.stage == "infer" and "poison input" in record.error
        assert record.request_id is not None
        assert base64.b64decode(record.original_b64) == sent[record.request_id]
