"""Transient model errors are retried with backoff; permanent ones fail the request at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Settings
from pipeline.models import LoadedModel, ModelRegistry, init_demo
from pipeline.observability.metrics import Metrics
from pipeline.protocol import codec
from pipeline.serving import Origin, Pipeline, is_transient, now_ms


@pytest.fixture
def pipeline(tmp_path: Path) -> Pipeline:
    init_demo(tmp_path)
    settings = Settings(model_dir=tmp_path, max_attempts=3, retry_backoff_ms=1)
    registry = ModelRegistry(tmp_path)
    registry.load_all()  # loading warms the model up: before run() is patched
    return Pipeline(settings, registry, None, Metrics())


def _job(p: Pipeline, i: int):  # type: ignore[no-untyped-def]
    body = {"id": f"r{i}", "model": "demo", "inputs": [
        {"name": "features", "datatype": "FP32", "shape": [16], "data": [0.1] * 16}]}  # fmt: skip
    return p.admit(Origin("t", 0, i, now_ms(), codec.encode(body)))


def test_is_transient() -> None:
    assert is_transient(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_transient(MemoryError())
    assert not is_transient(ValueError("bad input"))


def test_out_of_memory_is_retried_then_succeeds(pipeline: Pipeline, monkeypatch) -> None:
    calls = []
    real = LoadedModel.run

    def flaky(self: LoadedModel, batch: list[np.ndarray]) -> list[np.ndarray]:
        calls.append(len(batch[0]))
        if len(calls) < 3:
            raise RuntimeError("CUDA out of memory")
        return real(self, batch)

    monkeypatch.setattr(LoadedModel, "run", flaky)
    outcomes = pipeline.infer([_job(pipeline, i) for i in range(4)])
    assert calls == [4, 4, 4]  # the whole batch, three attempts, no bisection
    assert all(o.error is None for o in outcomes)


def test_retries_are_bounded_and_recorded_in_the_dlq(pipeline: Pipeline, monkeypatch) -> None:
    def always_oom(self: LoadedModel, batch: list[np.ndarray]) -> list[np.ndarray]:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(LoadedModel, "run", always_oom)
    [outcome] = pipeline.infer([_job(pipeline, 0)])
    assert outcome.error is not None and outcome.error.code == "model_error"
    assert outcome.error.attempts == 3
    [(_origin, records)] = pipeline.response_records([outcome], "infer")
    dlq = codec.decode_dlq(records[0].value)
    assert dlq.reason == "model_error" and dlq.attempts == 3


def test_permanent_errors_are_not_retried(pipeline: Pipeline, monkeypatch) -> None:
    calls = []

    def broken(self: LoadedModel, batch: list[np.ndarray]) -> list[np.ndarray]:
        calls.append(1)
        raise ValueError("shape mismatch")

    monkeypatch.setattr(LoadedModel, "run", broken)
    [outcome] = pipeline.infer([_job(pipeline, 0)])
    assert calls == [1] and outcome.error is not None and outcome.error.attempts == 1


def test_fp32_overflow_on_the_fast_path_is_bad_dtype_and_fails_alone(pipeline: Pipeline) -> None:
    body = {"id": "big", "model": "demo", "inputs": [
        {"name": "features", "datatype": "FP32", "shape": [16], "data": [1e39] * 16}]}  # fmt: skip
    big = pipeline.admit(Origin("t", 0, 99, now_ms(), codec.encode(body)))
    outcomes = pipeline.infer([_job(pipeline, 0), big, _job(pipeline, 1)])
    by_id = {o.job.request.id: o for o in outcomes}
    assert by_id["big"].error is not None and by_id["big"].error.code == "bad_dtype"
    assert by_id["r0"].error is None and by_id["r1"].error is None


def test_stage_latencies_are_recorded_per_batch(pipeline: Pipeline) -> None:
    outcomes = pipeline.infer([_job(pipeline, i) for i in range(3)])
    pipeline.response_records(outcomes, "infer")
    registry = pipeline.metrics.registry
    for stage in ("gateway", "infer", "respond"):
        labels = {"model": "demo", "version": "2", "stage": stage, "variant": ""}
        assert registry.get_sample_value("sluice_request_latency_seconds_count", labels) == 3
