"""The probes: readiness and liveness from the engine's state, served over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from prometheus_client import CollectorRegistry

from pipeline.observability.health import Health
from pipeline.observability.web import MetricsServer
from tests.unit.observability.test_web import get


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ready_needs_models_and_an_assignment_and_not_stopping() -> None:
    health = Health(clock=Clock())
    ok, state = health.ready()
    assert not ok
    assert state["reasons"] == ["models loading", "no assignment yet"]
    health.models_ready = True
    assert not health.ready()[0]
    health.assigned(0)  # more members than partitions: joined, assigned none, still ready
    ok, state = health.ready()
    assert ok and state == {
        "ready": True,
        "reasons": [],
        "models_ready": True,
        "partitions": 0,
    }
    health.stop()
    ok, state = health.ready()
    assert not ok and state["reasons"] == ["stopping"]


def test_live_once_the_loop_turns_and_not_after_it_stalls() -> None:
    clock = Clock()
    health = Health(stall_s=60.0, clock=clock)
    ok, state = health.live()
    assert not ok and state["reason"] == "starting"
    health.beat()
    clock.now += 59.0
    assert health.live()[0]
    clock.now += 2.0
    ok, state = health.live()
    assert not ok and "61 s" in state["reason"]
    health.stop()  # a stopping worker is not restarted for stopping: only a stall counts
    health.beat()
    assert health.live()[0]


def test_probes_over_http() -> None:
    health = Health()
    server = MetricsServer(CollectorRegistry(), "127.0.0.1", 0, health).start()
    try:
        status, headers, body = get(server.url + "/readyz")
        assert status == 503 and headers["Content-Type"] == "application/json"
        assert json.loads(body)["reasons"] == ["models loading", "no assignment yet"]
        assert get(server.url + "/healthz")[0] == 503
        health.models_ready = True
        health.assigned(2)
        health.beat()
        status, _, body = get(server.url + "/readyz")
        assert status == 200 and json.loads(body)["partitions"] == 2
        status, _, body = get(server.url + "/healthz")
        assert status == 200 and json.loads(body)["live"] is True
    finally:
        server.stop()


def test_no_probes_without_health() -> None:
    server = MetricsServer(CollectorRegistry(), "127.0.0.1", 0).start()
    try:
        assert get(server.url + "/readyz")[0] == 404
    finally:
        server.stop()


def test_a_stuck_shutdown_ends_the_process() -> None:
    script = (
        "import time; from pipeline.engines.worker import exit_if_stuck; "
        "exit_if_stuck(0.3, 'SIGTERM'); exit_if_stuck(60, 'again'); time.sleep(30)"
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 75  # EXIT_STUCK; the second call does not move the deadline
    assert time.monotonic() - started < 30
    assert "still stopping 0 s after SIGTERM: exiting" in done.stderr


def test_a_revoke_before_the_first_assignment_is_not_one() -> None:
    health = Health()
    health.models_ready = True
    health.revoked()  # faust's first rebalance starts with one
    assert health.ready()[1]["reasons"] == ["no assignment yet"]
    health.assigned(3)
    health.revoked()
    assert health.ready() == (True, {"ready": True, "reasons": [], "models_ready": True,
                                     "partitions": 0})  # fmt: skip
