"""`benchmarks.peers` at small scale: every system answers every request correctly, the Quix
Streams peer included (installed into its cache virtualenv on the first run)."""

from __future__ import annotations

import pytest

from benchmarks import peers


@pytest.mark.timeout(900)
def test_peers_answer_every_request(settings) -> None:
    result = peers.run(settings, requests=300, rate=300.0, paced_requests=300)
    assert set(result["systems"]) == set(peers.SYSTEMS)
    for name, runs in result["systems"].items():
        expected = "relayed" if name in ("relay", "guarded") else "ok"
        kinds = {"max", "paced", "at_quix_half"} if name in ("quix", "fused") else {"max", "paced"}
        assert set(runs) == kinds, name
        for kind, summary in runs.items():
            assert summary["sent"] == summary["answered"] == 300, (name, kind)
            assert summary["outcomes"] == {expected: 300}, (name, kind)
            assert summary["wrong_outputs"] == 0 and summary["duplicates"] == 0, (name, kind)
            assert summary["throughput_rps"] > 0
    assert result["all_correct"]
    ratios = result["ratios"]
    assert ratios["fused_over_quix_max"] > 0 and ratios["fused_over_relay_max"] > 0
    assert ratios["guarded_over_relay_max"] > 0 and ratios["fused_over_guarded_max"] > 0
    assert ratios["fused_p50_ms_paced"] > 0 and ratios["quix_p50_ms_paced"] > 0


def test_quix_venv_is_reused(settings) -> None:
    """The second call finds the marked virtualenv and installs nothing."""
    first = peers.quix_python(settings.cache_dir)
    assert (first.parent.parent / "complete").exists()
    assert peers.quix_python(settings.cache_dir) == first
