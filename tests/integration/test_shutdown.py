"""A worker's shutdown is bounded even when its broker is gone: SIGTERM to idle fused workers
(the batch engine and the faust engine) whose broker was stopped under them. Before the bound,
the faust worker waited for the broker without end and needed SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.engines.worker import EXIT_STUCK
from pipeline.kafka import ensure_topics, pipeline_topics
from pipeline.ops import procs
from pipeline.ops.broker import LocalBroker, free_port
from tests.integration.conftest import make_settings


def _probe(port: int, path: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def _wait_ready(port: int, timeout_s: float = 120.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    state: dict[str, object] = {}
    while time.monotonic() < deadline:
        try:
            status, state = _probe(port, "/readyz")
            if status == 200:
                return state
        except OSError:
            pass  # not serving yet
        time.sleep(0.3)
    raise AssertionError(f"not ready after {timeout_s} s: {state}")


@pytest.mark.timeout(400)
def test_sigterm_with_the_broker_gone_exits_within_the_bound(
    tmp_path: Path, model_dir: Path
) -> None:
    broker = LocalBroker(tmp_path / "kafka", Settings().cache_dir)
    state = broker.start()
    bound_s = 8.0
    # Each engine its own topics and group (the two engines' group protocols differ).
    workers = {
        engine: make_settings(state.bootstrap, model_dir, engine=engine, metrics_port=free_port(),
                              shutdown_timeout_s=bound_s, drain_timeout_s=4.0)
        for engine in ("batch", "faust")
    }  # fmt: skip
    for s in workers.values():
        ensure_topics(s, pipeline_topics(s, ["demo"]))
    running = {
        engine: procs.spawn(s, ["worker", "--mode", "fused"], tmp_path / f"{engine}.log")
        for engine, s in workers.items()
    }
    try:
        for engine, s in workers.items():
            ready = _wait_ready(s.metrics_port)
            assert ready["models_ready"] is True, (engine, ready)
            live = _probe(s.metrics_port, "/healthz")
            assert live[0] == 200, (engine, live, ready)
        assert broker.stop()
        time.sleep(3)  # the clients notice
        stopped_at = time.monotonic()
        for p in running.values():
            p.send_signal(signal.SIGTERM)
        exits = {}
        for engine, p in running.items():
            try:
                exits[engine] = (p.wait(timeout=bound_s + 7), time.monotonic() - stopped_at)
            except subprocess.TimeoutExpired:
                exits[engine] = (None, time.monotonic() - stopped_at)
    finally:
        procs.stop(list(running.values()), timeout_s=1)
        broker.stop()
    logs = {e: (tmp_path / f"{e}.log").read_text(errors="replace")[-3000:] for e in running}
    # The batch engine stops cleanly without a broker; the faust engine's aiokafka consumer
    # waits for it, so the watchdog ends it at the bound.
    assert exits["batch"][0] == 0, (exits, logs["batch"])
    assert exits["faust"][0] in (0, EXIT_STUCK), (exits, logs["faust"])
    for engine, (_, seconds) in exits.items():
        assert seconds < bound_s + 5, (engine, exits, logs[engine])
