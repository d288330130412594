"""The broker stops in the middle of a run and comes back on the same port and data: the
worker and the client reconnect by themselves, and every request is answered.

The scenario is `benchmarks.chaos.broker_restart`, on a broker of its own (the session's must
stay up).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import chaos
from tests.integration.conftest import make_settings

# 20 s at 300/s: the broker is back (its start takes seconds on a loaded machine) while
# requests are still being sent.
N = 6000


def test_broker_restart_mid_run_loses_nothing(model_dir: Path, tmp_path: Path) -> None:
    settings = make_settings("", model_dir)  # the scenario sets its own broker's address
    result = chaos.broker_restart(settings, tmp_path, requests=N, rate=300.0)
    print(result)
    assert result["broker_stopped"], "the broker was not running"
    assert result["same_port"]
    assert result["sender_finished"]
    assert 0 < result["stopped_at"] < result["restarted_at"] < N, result
    assert result["crashes_unexpected"] == 0, "the worker exited"
    assert result["sent"] == N
    assert result["answered"] == N and result["lost"] == 0, result.get("broker_log_tail")
    assert result["ids_mismatched"] == 0
    assert result["recovery_s"] >= 0
    assert result["outcomes"] == {"ok": N}
