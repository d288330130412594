"""A fused worker killed with SIGKILL every few seconds during a run, restarted right after
each kill: every request is answered. At-least-once may publish a response more than once (the
duplicates are counted, and the client resolves each id once); exactly-once publishes each
response once, as a read_committed reader sees it.

The scenario is `benchmarks.chaos.crash`; the issue's 100k-request run is
``sluice chaos --scenario crash --requests 100000 [--delivery exactly_once]``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import chaos
from tests.integration.conftest import make_settings

N = 20_000
KILL_EVERY_S = 7.0


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
def test_kill_loop_answers_every_request(
    delivery: str, bootstrap: str, model_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(bootstrap, model_dir).replace(delivery=delivery)
    result = chaos.crash(settings, tmp_path, requests=N, kill_every_s=KILL_EVERY_S)
    print(result)
    assert result["crashes_unexpected"] == 0, result.get("unexpected_exit_logs")
    assert result["crashes"] == len(result["kills"]) >= 2, result["kills"]
    # Each kill hit a worker that had been serving: answers kept coming between kills (in
    # exactly-once mode too: a restarted worker fences its predecessor's transaction at once).
    assert result["answers_between_kills"], result["kills"]

    assert result["sent"] == N
    assert result["answered"] == N and result["lost"] == 0
    assert result["ids_mismatched"] == 0
    assert result["outcomes"] == {"ok": N}
    # The client resolves each request id exactly once, however often it was answered.
    assert result["client_resolved_once"]
    assert result["responses_committed"] == N, "responses missing from the topic"
    if delivery == "exactly_once":
        # Responses of transactions that a kill aborted stay on the topic (a read_uncommitted
        # reader counts them as duplicates), but a read_committed reader never sees them.
        assert result["duplicates_seen"] == 0
