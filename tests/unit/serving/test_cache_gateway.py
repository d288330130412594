"""The gateway's feature enrichment and result cache, through `Pipeline` (no broker)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from benchmarks.bench_prefetch import (
    FEATURE_DIM,
    feature_request,
    feature_value,
    init_feature_model,
)
from pipeline.config import Settings
from pipeline.features.base import FeatureSource, WrappedSource
from pipeline.features.sources.files import FileSource
from pipeline.models import ModelRegistry
from pipeline.observability.metrics import Metrics
from pipeline.protocol import codec
from pipeline.serving import Job, Origin, Pipeline, now_ms


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
    if name.startswith(("sluice_requests_total", "sluice_request_latency")):
        labels.setdefault("variant", "")  # outside any experiment
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
    # Batched through the pipeline vs one row directly: float sums round per shape.
    np.testing.assert_allclose(outcome.outputs[0], direct.detach().numpy()[0], rtol=1e-5, atol=1e-6)  # type: ignore[index]


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


class _CountingSource(WrappedSource):
    """Records each source round trip (the keys asked for) of the source it wraps."""

    def __init__(self, inner: FeatureSource) -> None:
        super().__init__(inner)
        self.calls: list[list[str]] = []

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        keys = list(keys)
        self.calls.append(keys)
        return self.inner.get_many(keys)


def test_a_batchs_misses_share_one_source_round_trip(pipeline: Pipeline) -> None:
    assert pipeline.features is not None
    source = _CountingSource(pipeline.features.source)
    pipeline.features.source = source
    no_key = feature_request("r4", "x")
    del no_key["key"]
    batch = [
        _origin(feature_request("r0", "user-1"), 0),
        _origin(feature_request("r1", "user-2"), 1),
        _origin(feature_request("r2", "user-1"), 2),  # the same key twice: fetched once
        _origin(feature_request("r3", "nobody"), 3),
        _origin(no_key, 4),
        Origin("requests", 0, 5, now_ms(), b"{not json"),
        _origin(feature_request("r6", "user-3"), 6),
    ]
    admitted = pipeline.admit_many(batch)
    assert len(source.calls) == 1
    # "nobody" is not in the Bloom filter: kept off the source.
    assert sorted(source.calls[0]) == ["user-1", "user-2", "user-3"]
    kinds = [type(a).__name__ for a in admitted]
    assert kinds == ["Job", "Job", "Job", "tuple", "tuple", "tuple", "Job"]
    for i, key in ((0, "user-1"), (1, "user-2"), (2, "user-1"), (6, "user-3")):
        job = admitted[i]
        assert isinstance(job, Job) and job.origin.offset == i
        assert job.request.inputs[-1].data == feature_value(key)
    assert _answer(admitted[3]).error.code == codec.UNKNOWN_KEY  # type: ignore[union-attr]
    assert _answer(admitted[4]).error.code == codec.UNKNOWN_KEY  # type: ignore[union-attr]
    _o, records = admitted[5]  # type: ignore[misc]
    assert [json.loads(r.value)["reason"] for r in records] == ["malformed"]  # no id to answer
    assert _sample(pipeline, "sluice_cache_requests_total", tier="l3", result="hit") == 3
    # The same batch again: every key is cached now, no round trip at all.
    again = pipeline.admit_many(batch)
    assert len(source.calls) == 1
    assert [type(a).__name__ for a in again] == kinds


def test_a_failing_source_fails_the_batchs_feature_requests_only(pipeline: Pipeline) -> None:
    assert pipeline.features is not None

    class Down(_CountingSource):
        def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
            raise ConnectionError("source unreachable")

    pipeline.features.source = Down(pipeline.features.source)
    batch = [
        _origin(feature_request("d0", "user-5"), 0),
        Origin("requests", 0, 1, now_ms(), b"{not json"),
        _origin(feature_request("d2", "user-6"), 2),
    ]
    admitted = pipeline.admit_many(batch)
    assert len(admitted) == 3 and not any(isinstance(a, Job) for a in admitted)
    # Dead-lettered with a reason of their own (replayable once the source is back), and
    # answered with it; the malformed record keeps its own reason.
    for i in (0, 2):
        _o, records = admitted[i]  # type: ignore[misc]
        [dlq] = [json.loads(r.value) for r in records if r.topic.endswith("dlq")]
        assert dlq["offset"] == i and "source unreachable" in dlq["error"]
        assert dlq["reason"] == codec.FEATURE_UNAVAILABLE
        assert _answer(admitted[i]).error.code == codec.FEATURE_UNAVAILABLE  # type: ignore[union-attr]
    _o, records = admitted[1]  # type: ignore[misc]
    assert [json.loads(r.value)["reason"] for r in records] == ["malformed"]
    # One at a time, the same.
    [single] = [pipeline.admit_or_reject(batch[0])]
    assert _answer(single).error.code == codec.FEATURE_UNAVAILABLE  # type: ignore[union-attr, arg-type]


def test_admit_cached_defers_only_the_requests_the_source_must_answer(
    pipeline: Pipeline,
) -> None:
    """The batch engine's path: cached features are admitted at once, the rest wait for one
    round trip (`fetch_features`, on another thread there) and are admitted after it."""
    assert pipeline.features is not None
    source = _CountingSource(pipeline.features.source)
    pipeline.features.source = source
    pipeline.admit_many([_origin(feature_request("w0", "user-1"), 0)])  # user-1 now cached
    calls = len(source.calls)
    batch = [
        _origin(feature_request("c0", "user-1"), 0),
        _origin(feature_request("m1", "user-2"), 1),
        Origin("requests", 0, 2, now_ms(), b"{not json"),
        _origin(feature_request("a3", "nobody"), 3),  # absent (Bloom filter): answered now
        _origin(feature_request("m4", "user-2"), 4),
    ]
    admitted, deferred = pipeline.admit_cached(batch)
    assert len(source.calls) == calls, "admit_cached must not wait for the source"
    assert [type(a).__name__ for a in admitted] == ["Job", "tuple", "tuple"]
    assert isinstance(admitted[0], Job) and admitted[0].origin.offset == 0
    assert _answer(admitted[2]).error.code == codec.UNKNOWN_KEY
    assert deferred is not None and deferred.count == 2 and deferred.misses == {"user-2": -1}

    later = pipeline.admit_fetched(deferred, pipeline.fetch_features(deferred))
    assert len(source.calls) == calls + 1 and source.calls[-1] == ["user-2"]
    assert [a.origin.offset for a in later if isinstance(a, Job)] == [1, 4]
    assert all(
        a.request.inputs[-1].data == feature_value("user-2") for a in later if isinstance(a, Job)
    )

    # A failed round trip fails the deferred requests only, each with its reason.
    _, deferred = pipeline.admit_cached([_origin(feature_request("m5", "user-3"), 5)])
    assert deferred is not None
    failed = pipeline.admit_fetched(deferred, ConnectionError("source unreachable"))
    assert _answer(failed[0]).error.code == codec.FEATURE_UNAVAILABLE
