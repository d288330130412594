"""On CUDA, batches whose inputs are prepared on the worker (text, images, records) are prepared and
submitted on the preparation thread, in order, and answered like any other; a bad row fails
alone."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import Settings
from pipeline.models import DEMO_FEATURES, LoadedModel, ModelRegistry, init_demo
from pipeline.observability.metrics import Metrics
from pipeline.protocol import codec
from pipeline.serving import Origin, Pipeline, execution, now_ms

FIELDS = [f"f{i}" for i in range(DEMO_FEATURES)]


@pytest.fixture
def pipeline(tmp_path: Path) -> Pipeline:
    init_demo(tmp_path)
    config_file = tmp_path / "demo" / "1" / "config.json"
    config = json.loads(config_file.read_text())
    config["fields"] = FIELDS  # the classifier's 16 features, sent as named fields
    config_file.write_text(json.dumps(config))
    registry = ModelRegistry(tmp_path)
    registry.load_all()
    return Pipeline(Settings(model_dir=tmp_path), registry, None, Metrics())


def _job(p: Pipeline, i: int, value: object = 0.5):  # type: ignore[no-untyped-def]
    fields = [{"name": f, "datatype": "FP64", "shape": [1], "data": [value]} for f in FIELDS]
    body = {"id": f"r{i}", "model": "demo", "version": "1", "inputs": fields}
    return p.admit(Origin("t", 0, i, now_ms(), codec.encode(body)))


def test_prepared_batches_run_on_the_preparation_thread(pipeline: Pipeline, monkeypatch) -> None:
    # On CUDA (here forced: the machine may have no GPU).
    monkeypatch.setattr(execution, "prepares_off_loop", lambda model: True)
    threads: list[str] = []
    real = LoadedModel.stack_inputs

    def spy(self: LoadedModel, rows):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return real(self, rows)

    monkeypatch.setattr(LoadedModel, "stack_inputs", spy)
    jobs = [_job(pipeline, i) for i in range(6)]
    first, second = pipeline.start(jobs[:3]), pipeline.start(jobs[3:])
    assert first.started is not None and second.started is not None
    outcomes = pipeline.finish(first) + pipeline.finish(second)
    assert [o.job.request.id for o in outcomes] == [f"r{i}" for i in range(6)]
    assert all(o.error is None and o.outputs is not None for o in outcomes)
    assert threads and all(t.startswith("sluice-prepare") for t in threads)
    module = pipeline.registry.resolve("demo", "1").module
    with torch.inference_mode():
        want = module(torch.full((1, DEMO_FEATURES), 0.5)).numpy()[0]
    assert np.allclose(outcomes[0].outputs[0], want, atol=1e-6)  # type: ignore[index]
    pipeline.close()


def test_on_the_cpu_batches_are_prepared_inline(pipeline: Pipeline) -> None:
    running = pipeline.start([_job(pipeline, 0)])
    assert running.started is None and running.pending is not None
    [outcome] = pipeline.finish(running)
    assert outcome.error is None


def test_a_bad_row_fails_alone(pipeline: Pipeline) -> None:
    # 1e300 is a valid FP64 field but out of range for the model's FP32 vector: found when
    # the batch is prepared, so the batch is split until that request fails alone.
    jobs = [_job(pipeline, 0), _job(pipeline, 1, 1e300), _job(pipeline, 2)]
    running = pipeline.start(jobs)
    outcomes = pipeline.finish(running)
    codes = [o.error.code if o.error else "ok" for o in outcomes]
    assert codes == ["ok", "bad_field", "ok"]
    pipeline.close()
