"""The pure parts of `benchmarks.chaos`: duplicate counting, the RSS slope, argument checks."""

from __future__ import annotations

import os
from collections import Counter

import pytest

from benchmarks import chaos
from benchmarks.harness import rss_mb
from pipeline.config import Settings


def test_duplicates_count_records_beyond_the_first_per_key() -> None:
    assert chaos.duplicates(Counter()) == 0
    assert chaos.duplicates(Counter({"r-1": 1, "r-2": 1})) == 0
    assert chaos.duplicates(Counter({"r-1": 3, "r-2": 1, "r-3": 2})) == 3


def test_slope_is_per_minute_least_squares() -> None:
    # 0.5 MiB per second, sampled every 5 s: 30 MiB per minute.
    samples = [(float(t), 700.0 + 0.5 * t) for t in range(0, 300, 5)]
    assert chaos.slope_per_min(samples) == pytest.approx(30.0)
    assert chaos.slope_per_min([(0.0, 5.0), (60.0, 5.0), (120.0, 5.0)]) == 0.0
    # Noise around a flat line fits to (nearly) flat; one outlier does not set the slope.
    flat = [(float(t), 700.0 + (1.0 if t % 10 else -1.0)) for t in range(0, 600, 5)]
    assert abs(chaos.slope_per_min(flat)) < 0.05
    assert chaos.slope_per_min([(0.0, 1.0), (30.0, 2.0)]) == pytest.approx(2.0)


@pytest.mark.parametrize("samples", [[], [(1.0, 5.0)], [(2.0, 1.0), (2.0, 3.0)]])
def test_slope_needs_two_times(samples: list[tuple[float, float]]) -> None:
    with pytest.raises(ValueError, match="slope needs"):
        chaos.slope_per_min(samples)


def test_run_names_a_bad_scenario_and_sizes() -> None:
    settings = Settings.from_env({})
    with pytest.raises(ValueError, match="got 'meltdown'"):
        chaos.run(settings, "meltdown")
    with pytest.raises(ValueError, match="requests must be an integer >= 1, got 0"):
        chaos.run(settings, "crash", requests=0)
    with pytest.raises(ValueError, match="duration_s must be > 0 seconds, got -1"):
        chaos.run(settings, "soak", duration_s=-1)


def test_every_issue_scenario_is_runnable() -> None:
    assert set(chaos.SCENARIOS) == {
        "overload", "crash", "broker-restart", "leader-kill", "rolling-restart",
        "rolling-update", "garbage", "poison", "scale-out", "soak",
    }  # fmt: skip
    from pipeline.cli import CHAOS_SCENARIOS

    assert set(CHAOS_SCENARIOS) == set(chaos.SCENARIOS)


def test_rss_sampler_reads_this_process() -> None:
    mine = rss_mb(os.getpid())
    assert mine > 1.0
    with chaos.RssSampler(lambda: [os.getpid()], interval_s=0.01) as sampler:
        pass
    assert sampler.samples and sampler.max_mb > 1.0
    assert sampler.samples[0][1] == pytest.approx(mine, rel=0.5)


def test_rss_sampler_skips_processes_that_are_gone() -> None:
    with chaos.RssSampler(lambda: [2**22 + 12345], interval_s=0.01) as sampler:
        pass
    assert sampler.max_mb == 0.0 and sampler.samples[0][1] == 0.0


def test_recovery_is_when_the_last_answer_the_fault_delayed_arrived() -> None:
    from concurrent.futures import Future

    from benchmarks.chaos.common import SLOW_S, Timeline

    timeline = Timeline()
    futures: list[Future] = [Future() for _ in range(3)]  # type: ignore[type-arg]
    for f in futures:
        timeline.track(f)
    timeline.sent = [10.0, 11.0, 12.0]
    timeline.answered = {0: 10.1, 1: 11.0 + SLOW_S + 4.0, 2: 12.2}
    delayed = timeline.recovery_s(fault_at=10.5)  # request 1's answer
    assert delayed == pytest.approx(4.0 + SLOW_S + 0.5, rel=1e-6, abs=0.01)
    assert timeline.recovery_s(fault_at=20.0) == pytest.approx(0.0, abs=1e-9)  # none delayed
