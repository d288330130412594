"""Integration fixtures: one real Kafka broker per session, fresh topics per test."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from pipeline import procs
from pipeline.broker import LocalBroker
from pipeline.client import Client
from pipeline.config import Settings, default_cache_dir
from pipeline.kafka import ensure_topics, pipeline_topics
from pipeline.models import ModelRegistry, init_demo

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


class Workers:
    """Worker processes of one pipeline; their logs are printed when a test fails."""

    def __init__(self, settings: Settings, mode: str, log_dir: Path) -> None:
        self.settings = settings
        self.mode = mode
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> Workers:
        self.procs = procs.spawn_workers(self.settings, self.mode, self.log_dir)
        return self

    def stop(self) -> None:
        procs.stop(self.procs)

    def kill(self) -> None:
        procs.kill(self.procs)

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.log_dir.glob("*.log"))
        )

    def wait_ready(self, client: Client, timeout_s: float = 90.0) -> int:
        """Send probe requests until one is answered; returns how many were sent (each is
        answered in the end: the unanswered ones wait in Kafka for the worker)."""
        deadline = time.monotonic() + timeout_s
        i = 0
        while time.monotonic() < deadline:
            assert self.alive(), f"worker exited:\n{self.logs()}"
            future = client.submit(demo_request(f"probe-{uuid.uuid4().hex[:6]}-{i}"))
            client.flush()
            try:
                future.result(timeout=3)
                return i + 1
            except Exception:  # noqa: BLE001 - not ready yet
                i += 1
        raise AssertionError(f"pipeline not ready after {timeout_s}s:\n{self.logs()}")


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


def demo_request(request_id: str, features: list[float] | None = None, **extra: object) -> dict:  # type: ignore[type-arg]
    features = features if features is not None else [0.1 * i for i in range(16)]
    return {
        "id": request_id,
        "model": "demo",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [16], "data": features}],
        **extra,
    }


class PacedSender(threading.Thread):
    """Submits demo requests ``r-0`` .. ``r-<n-1>`` at ``rate`` per second from a thread.

    ``futures`` fills as the requests go out, so a test can act (stop a worker, the broker)
    in the middle of the run and count how far it got.
    """

    def __init__(
        self,
        client: Client,
        n: int,
        rate: float,
        on_future: Callable[[Future], None] | None = None,  # type: ignore[type-arg]
        flush: bool = True,
    ) -> None:
        super().__init__(daemon=True)
        self.client, self.n, self.rate = client, n, rate
        self.on_future, self.flush = on_future, flush
        self.futures: list[Future] = []  # type: ignore[type-arg]

    def run(self) -> None:
        start = time.monotonic()
        for i in range(self.n):
            delay = start + i / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            future = self.client.submit(demo_request(f"r-{i}"))
            if self.on_future is not None:
                self.on_future(future)
            self.futures.append(future)
        if self.flush:
            self.client.flush()
