"""Integration fixtures: one real Kafka broker per session, fresh topics per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Re-exported for the tests: one copy of each, in the library (`benchmarks.harness`).
from benchmarks.harness import PacedSender, Workers, demo_request  # noqa: F401
from pipeline.client import Client
from pipeline.config import Settings, default_cache_dir
from pipeline.kafka import ensure_topics, pipeline_topics
from pipeline.models import ModelRegistry, init_demo
from pipeline.ops.broker import LocalBroker

_BROKER: LocalBroker | None = None


@pytest.fixture(scope="session")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``SLUICE_BOOTSTRAP`` when set, else a local broker started for this session."""
    global _BROKER
    if os.environ.get("SLUICE_BOOTSTRAP"):
        yield os.environ["SLUICE_BOOTSTRAP"]
        return
    cache = Path(os.environ.get("SLUICE_CACHE_DIR") or default_cache_dir())
    broker = LocalBroker(tmp_path_factory.mktemp("kafka"), cache)
    state = broker.start()
    _BROKER = broker
    try:
        yield state.bootstrap
    finally:
        broker.stop()
        _BROKER = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)
    if report.failed and _BROKER is not None:
        report.sections.append(("kafka broker log (tail)", _BROKER.log_tail(80)))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models")
    init_demo(path)
    return path


@pytest.fixture(scope="session")
def registry(model_dir: Path) -> ModelRegistry:
    return ModelRegistry(model_dir)


def make_settings(bootstrap: str, model_dir: Path, **overrides: object) -> Settings:
    """Settings on uuid-named topics and groups, so tests never see each other's records."""
    base = {
        "bootstrap": bootstrap,
        "model_dir": model_dir,
        "topic_prefix": f"t{uuid.uuid4().hex[:10]}",
        "partitions": 2,
        "max_delay_s": 0.002,
    }
    base.update(overrides)
    return Settings.from_env({}, **base)


@pytest.fixture
def settings(bootstrap: str, model_dir: Path) -> Settings:
    settings = make_settings(bootstrap, model_dir)
    ensure_topics(settings, pipeline_topics(settings, ["demo"]))
    return settings


@pytest.fixture
def start_workers(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator:  # type: ignore[type-arg]
    started: list[Workers] = []

    def start(settings: Settings, mode: str) -> Workers:
        log_dir = tmp_path / f"logs-{mode}-{len(started)}"
        log_dir.mkdir()
        workers = Workers(settings, mode, log_dir).start()
        started.append(workers)
        return workers

    yield start
    failed = getattr(request.node, "rep_call", None)
    for workers in started:
        workers.stop()
        if failed is not None and failed.failed:
            print(workers.logs())


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings) as c:
        yield c
