"""The autoscaling simulator: the HPA's arithmetic, its stabilisation, the backlog's
bookkeeping, and the comparisons between triggers that its defaults are meant to show."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.ops import autoscale
from pipeline.ops.autoscale import Group, Policy, Result, Scenario, Trace, TriggerKind

Results = dict[tuple[str, str], Result]


def flat(load_per_s: int, seconds: int, start: int, then: int = 0, after_s: int = 0) -> Trace:
    """A noise-free trace of cost-1 records: ``load_per_s`` for ``seconds``, then ``then``."""
    counts = (load_per_s,) * seconds + (then,) * after_s
    return Trace("flat", counts, (1.0,) * len(counts), start, change_s=0)


@pytest.fixture(scope="module")
def defaults() -> Results:
    """Every trigger on every scenario, with the CLI's defaults."""
    return {(r.scenario, r.trigger): r for r in autoscale.compare()}


@pytest.mark.parametrize(
    ("current", "metric", "target", "total", "expected"),
    [
        (2, 1.05, 1.0, False, 2),  # within the 10 % tolerance: no change
        (2, 0.91, 1.0, False, 2),
        (2, 2.0, 1.0, False, 4),  # ceil(2 x 2.0)
        (2, 1.2, 1.0, False, 3),  # ceil(2.4)
        (4, 0.2, 1.0, False, 1),  # ceil(0.8)
        (2, 1.4, 0.7, False, 4),  # 1.4 / 0.7 is 2.0000000000000004 in floats: still 4
        (3, 20_000, 5_000, True, 4),  # AverageValue: ceil(total / target), whatever current
        (3, 15_500, 5_000, True, 3),  # 15,500 / (3 x 5,000) is within tolerance
        (9, 12_000, 5_000, True, 3),
    ],
)
def test_hpa_formula_and_tolerance(
    current: int, metric: float, target: float, total: bool, expected: int
) -> None:
    assert autoscale.hpa_desired(current, metric, target, 0.1, total) == expected


def test_replicas_clamped_to_partitions_and_min() -> None:
    assert Group(partitions=4, max_replicas=50).ceiling == 4
    # Ten times what four partitions' owners can do: the time-lag trigger wants far more.
    swamped = autoscale.simulate(flat(40_000, 300, start=1), "time", Group(partitions=4))
    assert max(swamped.replicas) == 4
    # No load: CPU proposes 0 replicas, the floor holds at min_replicas.
    idle = autoscale.simulate(flat(0, 600, start=3), "cpu", Group(min_replicas=2))
    assert min(idle.replicas) == 2 and idle.final_replicas == 2


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Group(partitions=0), "partitions must be an integer >= 1, got 0"),
        (lambda: Group(max_replicas=0), "max_replicas must be an integer >= 1, got 0"),
        (lambda: Group(partitions=4, min_replicas=5), "min_replicas 5 > max 4"),
        (lambda: autoscale.Trigger(TriggerKind.TIME, time_lag_s=0), "time_lag_s must be > 0"),
    ],
)
def test_settings_are_validated(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_partition_skew_sets_the_drain_rate() -> None:
    group = Group(partitions=12, capacity_per_s=1000.0)
    # 5 replicas: one owns 3 partitions, so the slowest partition drains as if 4 replicas.
    assert group.drain_per_s(5) == pytest.approx(4000.0, abs=1e-9)
    assert group.drain_per_s(7) == pytest.approx(6000.0, abs=1e-9)
    assert group.drain_per_s(12) == pytest.approx(12000.0, abs=1e-9)
    assert group.drain_per_s(20) == pytest.approx(12000.0, abs=1e-9)  # past 12 they idle


def test_time_lag_is_the_age_of_the_oldest_unconsumed_record() -> None:
    # One replica of 100/s, 200 records/s offered for 10 s: after 10 s the records of the
    # first 5 s are consumed, so the oldest left arrived at 5 s.
    group = Group(partitions=1, capacity_per_s=100.0)
    result = autoscale.simulate(flat(200, 10, start=1, after_s=5), "cpu", group)
    assert result.time_lag_s[9] == pytest.approx(5.0, abs=1e-9)
    assert result.backlog == 2000 - 1500


def test_scale_down_waits_for_the_stabilisation_window() -> None:
    # 2,800 cost-1 records/s on 4 replicas of 1,000/s: CPU at its 0.7 target, proposal 4.
    # The load stops at 120 s; the last proposal of 4 was made at 120 s.
    load = flat(2800, 120, start=4, after_s=480)
    held = autoscale.simulate(load, "cpu")
    window = Policy().downscale_window_s
    assert set(held.replicas[: 120 + window - 1]) == {4}
    assert held.replicas[-1] == 1
    # Without the window the same run scales down at the first decision after the drop.
    eager = autoscale.simulate(load, "cpu", policy=Policy(downscale_window_s=15))
    assert eager.replicas[120 + 15] == 1


@pytest.mark.parametrize("scenario", list(Scenario))
@pytest.mark.parametrize("trigger", list(TriggerKind))
def test_records_are_conserved(scenario: Scenario, trigger: TriggerKind) -> None:
    group = Group()
    load = autoscale.trace(scenario, group, seed=2)
    result = autoscale.simulate(load, trigger, group)
    assert result.offered == sum(load.counts)
    assert result.offered == result.consumed + result.backlog


def test_replicas_never_exceed_partitions(defaults: Results) -> None:
    for result in defaults.values():
        assert max(result.replicas) <= Group().partitions
    for partitions in (3, 5):
        group = Group(partitions=partitions)
        for result in autoscale.compare(group=group):
            assert max(result.replicas) <= partitions


def test_step_time_lag_catches_up_no_later_than_cpu(defaults: Results) -> None:
    catch_up = {t.value: defaults[("step", t.value)].catch_up_s for t in TriggerKind}
    assert None not in catch_up.values(), catch_up  # every trigger is back within the run
    time, cpu, both = catch_up["time"], catch_up["cpu"], catch_up["time+cpu"]
    assert time is not None and cpu is not None and both is not None
    assert time <= cpu and both <= cpu


def test_mixed_offset_lag_misreads_heavy_records(defaults: Results) -> None:
    offset, time = defaults[("mixed", "offset")], defaults[("mixed", "time")]
    assert offset.worst_time_lag_s > time.worst_time_lag_s
    # While records are heavy (60 s to 360 s), the same record count is more work: offset
    # lag asks for fewer replicas and lets the time lag grow further.
    heavy = slice(60, 360)
    assert max(offset.replicas[heavy]) < max(time.replicas[heavy])
    assert max(offset.time_lag_s[heavy]) > max(time.time_lag_s[heavy])
    best = min(r.worst_time_lag_s for (s, _), r in defaults.items() if s == "mixed")
    assert defaults[("mixed", "time+cpu")].worst_time_lag_s == pytest.approx(best, abs=1e-9)


def test_same_seed_same_results() -> None:
    assert autoscale.compare(seed=7) == autoscale.compare(seed=7)
    (one,) = autoscale.compare(["mixed"], ["time"], seed=7)
    (other,) = autoscale.compare(["mixed"], ["time"], seed=8)
    assert one.offered != other.offered


def test_cli_prints_the_table_then_json() -> None:
    outcome = CliRunner().invoke(main, ["autoscale", "simulate"])
    assert outcome.exit_code == 0, outcome.output
    lines = outcome.output.strip().splitlines()
    assert lines[0].split() == list(autoscale.COLUMNS)
    assert len(lines) == 1 + len(Scenario) * len(TriggerKind) + 1
    summary = json.loads(lines[-1])
    assert set(summary["results"]) == {s.value for s in Scenario}
    for by_trigger in summary["results"].values():
        assert set(by_trigger) == {t.value for t in TriggerKind}
        for figures in by_trigger.values():
            assert figures["offered"] == figures["consumed"] + figures["backlog"]
            assert {"catch_up_s", "worst_time_lag_s", "replica_minutes", "scale_changes"} <= set(
                figures
            )


def test_cli_json_only_for_one_scenario_and_trigger() -> None:
    args = ["autoscale", "simulate", "--scenario", "step", "--trigger", "cpu", "--partitions",
            "6", "--capacity", "500", "--seed", "3", "--duration-s", "300", "--json"]  # fmt: skip
    outcome = CliRunner().invoke(main, args)
    assert outcome.exit_code == 0, outcome.output
    (line,) = outcome.output.strip().splitlines()
    summary = json.loads(line)
    assert summary["partitions"] == 6 and summary["duration_s"] == 300
    assert summary["capacity_per_s"] == pytest.approx(500.0, abs=1e-9)
    assert list(summary["results"]) == ["step"] and list(summary["results"]["step"]) == ["cpu"]
