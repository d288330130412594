"""The gateway's feature enrichment and result cache, through `Pipeline` (no broker)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from pipeline import codec
from pipeline.bench_prefetch import (
    FEATURE_DIM,
    feature_request,
    feature_value,
    init_feature_model,
)
from pipeline.cache.sources.files import FileSource
from pipeline.config import Settings
from pipeline.metrics import Metrics
from pipeline.models import ModelRegistry
from pipeline.stages import Job, Origin, Pipeline, now_ms


@pytest.fixture
def feature_settings(tmp_path: Path) -> Settings:
    models = tmp_path / "models"
    init_feature_model(models, version="1", seed=1)
    init_feature_model(models, version="2", seed=2)
    source = FileSource(tmp_path / "features")
    source.put_many({f"user-{i}": feature_value(f"user-{i}") for i in range(10)})
    source.put_many({"short": b"\0" * 8})  # the wrong size for the model's input
    source.close()
    return Settings(
        cache_dir=tmp_path / "cache",
        model_dir=models,
        feature_source=f"files://{tmp_path / 'features'}",
        prefetch_enabled=False,
        result_cache_enabled=True,
    )


@pytest.fixture
def pipeline(feature_settings: Settings) -> Iterator[Pipeline]:
    registry = ModelRegistry(feature_settings.models_path, device=torch.device("cpu"))
    p = Pipeline(feature_settings, registry, None, Metrics(CollectorRegistry()))
    yield p
    p.close()


def _origin(body: dict[str, object], offset: int = 0) -> Origin:
    return Origin("requests", 0, offset, now_ms(), json.dumps(body).encode())


def _answer(publication: object) -> codec.Response:
    assert isinstance(publication, tuple), publication
    _origin, records = publication
    response = [r for r in records if r.topic.endswith("responses")][0]
    return msgspec.json.decode(response.value, type=codec.Response)


def _sample(p: Pipeline, name: str, **labels: str) -> float:
    return p.metrics.registry.get_sample_value(name, labels) or 0.0


def test_enrichment_fills_the_feature_input(pipeline: Pipeline) -> None:
    job = pipeline.admit_or_reject(_origin(feature_request("r1", "user-3")))
    assert isinstance(job, Job)
    names = [t.name for t in job.request.inputs]
    assert names == ["query", "user"]
    user = np.frombuffer(feature_value("user-3"), "<f4")
    [outcome] = pipeline.infer([job])
    assert outcome.error is None
    model = pipeline.registry.resolve("recommend")
    direct = model.module(torch.full((1, 8), 0.25), torch.from_numpy(user.copy())[None])
    direct = direct[0] if isinstance(direct, (tuple, list)) else direct
    np.testing.assert_allclose(outcome.outputs[0], direct.detach().numpy()[0], rtol=1e-5)  # type: ignore[index]


def test_unknown_key_is_an_error_response_and_a_dlq_record(pipeline: Pipeline) -> None:
    rejected = pipeline.admit_or_reject(_origin(feature_request("r2", "nobody")))
    response = _answer(rejected)
    assert response.status == "error"
    assert response.error is not None and response.error.code == codec.UNKNOWN_KEY
    assert "'nobody'" in response.error.message
    _o, records = rejected  # type: ignore[misc]
    dlq = json.loads([r for r in records if r.topic.endswith("dlq")][0].value)
    assert dlq["reason"] == "unknown_key"
    assert _sample(pipeline, "sluice_dlq_total", reason="unknown_key") == 1
    # No key at all, for a model that needs one.
    body = feature_request("r3", "x")
    del body["key"]
    assert _answer(pipeline.admit_or_reject(_origin(body))).error.code == "unknown_key"  # type: ignore[union-attr]
    # Stored data of the wrong size for the input is the request's bad_shape, not a crash.
    wrong = _answer(pipeline.admit_or_reject(_origin(feature_request("r4", "short"))))
    assert wrong.error is not None and wrong.error.code == codec.BAD_SHAPE
    # Sending the input the store fills is refused.
    body = feature_request("r5", "user-1")
    body["inputs"].append(  # type: ignore[attr-defined]
        {"name": "user", "datatype": "FP32", "shape": [FEATURE_DIM], "data": [0.0] * FEATURE_DIM}
    )
    assert _answer(pipeline.admit_or_reject(_origin(body))).error.code == "bad_shape"  # type: ignore[union-attr]


def test_result_cache_answers_a_repeat_without_the_model(pipeline: Pipeline) -> None:
    first = pipeline.admit_or_reject(_origin(feature_request("a", "user-1")))
    assert isinstance(first, Job)
    [published] = pipeline.response_records(pipeline.infer([first]), "infer")
    computed = _answer(published)
    again = pipeline.admit_or_reject(_origin(feature_request("b", "user-1"), 1))
    assert not isinstance(again, Job)
    cached = _answer(again)
    assert cached.id == "b" and cached.status == "ok" and cached.model_version == "2"
    assert cached.outputs[0].data == computed.outputs[0].data
    assert cached.timings is not None and cached.timings.batch_size == 0
    assert _sample(pipeline, "sluice_cache_requests_total", tier="result", result="hit") == 1
    assert _sample(pipeline, "sluice_requests_total", model="recommend", version="2",
                   outcome="ok") == 2  # fmt: skip
    # Other features (another key) are other inputs: a miss.
    assert isinstance(pipeline.admit_or_reject(_origin(feature_request("c", "user-2"))), Job)


def test_result_cache_never_answers_for_another_version(pipeline: Pipeline) -> None:
    body = feature_request("v2", "user-4")
    job = pipeline.admit_or_reject(_origin(body))
    assert isinstance(job, Job) and job.model.version == "2"
    pipeline.response_records(pipeline.infer([job]), "infer")
    body_v1 = {**feature_request("v1", "user-4"), "version": "1"}
    job_v1 = pipeline.admit_or_reject(_origin(body_v1))
    assert isinstance(job_v1, Job), "version 1 must not be served version 2's cached result"
    [published] = pipeline.response_records(pipeline.infer([job_v1]), "infer")
    assert _answer(published).model_version == "1"
    hit = _answer(pipeline.admit_or_reject(_origin({**body_v1, "id": "v1-again"})))
    assert hit.model_version == "1"
