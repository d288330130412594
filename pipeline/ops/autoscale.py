"""Planning scale-out on Kubernetes: which autoscaling trigger keeps a consumer group's lag
down, and at what cost (``sluice autoscale simulate``).

A deterministic, one-second-step simulation of the replicas of one worker in one consumer
group under an offered load, scaled by the Horizontal Pod Autoscaler on offset lag (KEDA's
Kafka scaler), time lag (the oldest unconsumed record's age, e.g. a Prometheus trigger), CPU,
or time lag and CPU together. No Kafka, no clock: the same seed gives the same figures.

The group:
    Each replica does ``capacity_per_s`` units of work a second (a record of cost 1 is one
    unit). Partitions are evenly loaded, so the replica that owns ``ceil(P / n)`` of the P
    partitions sets the pace of the slowest partition: the group drains its oldest record at
    ``capacity_per_s * P / ceil(P / n)`` (12 partitions: 5 replicas are worth 4, 7 to 11 are
    worth 6), and a replica beyond P idles. The backlog is one FIFO of ``(arrival_s, count,
    cost)`` chunks drained at that rate: time lag (a tick's end minus the arrival of the
    oldest unconsumed record, records stamped with their tick's start) is exact to the tick
    and is the max over partitions, and offset lag is the records in it. A new pod
    consumes ``startup_s`` after it is asked for; whenever the consuming count changes, the
    whole group consumes nothing for ``rebalance_s`` (an eager rebalance).

The autoscaler, as the Kubernetes docs give it (kubernetes.io/docs/tasks/run-application/
horizontal-pod-autoscale, "Algorithm details" and "Default Behavior"):
    - every ``sync_s`` (15 s, ``--horizontal-pod-autoscaler-sync-period``)
      ``desiredReplicas = ceil[currentReplicas * (currentMetricValue / desiredMetricValue)]``,
      unchanged while the ratio is within ``tolerance`` (0.1) of 1; with several metrics,
      the largest proposal wins;
    - scale-up: no stabilisation, at most the larger of +100 % and +4 pods a period;
    - scale-down: the largest proposal of the last ``downscale_window_s`` (300 s);
    - clamped to [min, max], max at most the partition count: KEDA's Kafka scaler does not
      go past it unless ``allowIdleConsumers: true`` (keda.sh/docs/latest/scalers/
      apache-kafka; ``limitToPartitionsWithLag``, a cap at the partitions with lag, is not
      modelled). KEDA's ``pollingInterval`` (30 s) only wakes a group from zero; min is 1.

The triggers (`TriggerKind`):
    - ``offset``: KEDA reports the total lag as an AverageValue external metric and the HPA
      divides it by ``lagThreshold`` per replica: desired = ceil(total_lag / threshold)
      (the tolerance compares total_lag with threshold x all pods). Default threshold:
      5 x capacity records, 5 s of cost-1 work a replica, to match the time-lag target.
    - ``time``: the max time lag over partitions as a Value metric, target 5 s: desired =
      ceil(ready x time_lag / target) (the HPA's replica calculator multiplies a Value
      ratio by the ready pods, not by those still starting).
      A caught-up group has no lag, so it proposes min replicas: 300 s after catching up it
      falls to min and the lag builds again. That is why it is paired with CPU:
    - ``cpu``: the busy fraction of the consuming pods over the last period (the HPA averages
      ready pods), target 0.7: desired = ceil(ready x cpu / 0.7). CPU saturates at 1.0, so
      one decision grows the group by at most 1/0.7 = 1.43x, and a saturated group reads the
      same with 10 s of backlog as with 10 minutes: it is the slowest to catch up.
    - ``time+cpu``: both (the larger proposal): time lag reacts to a backlog, CPU holds the
      count a caught-up group needs.
    Offset lag counts records, not work: when records get heavier (``mixed``) the same
    threshold holds several times the seconds of backlog, and the group under-provisions.

Scenarios (`Scenario`), rates in replicas' worth of cost-1 records, the load first changing
at `CHANGE_S` (60 s) in each; the run starts with the replicas that serve the base load at
70 % busy, as if the HPA had proposed that count all along:
    - ``step``: 2 -> 5; ``ramp``: 1 -> 5.5 over 240 s, then held;
    - ``spikes``: 2, with four 20 s bursts of 8, 120 s apart;
    - ``mixed``: 1.25 (1,250 records/s at the default capacity), 5 % of them of cost 10
      (the rest 1), 25 % from 60 s to 360 s: the work per record goes from 1.45 to 3.25
      while the record count stays flat, and the 5,000-record threshold from 7 s to 16 s.
Catch-up: seconds from `CHANGE_S` until the time lag, once past `CAUGHT_UP_LAG_S`, is back
within it (0: never past; None: not back within the run). Replica-minutes count every pod
that exists, starting ones included (they hold their node's resources); scale changes count
the decisions that changed the replica count (flaps).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

TICK_S = 1
CHANGE_S = 60
HEAVY_COST = 10.0
CAUGHT_UP_LAG_S = 2.0 * TICK_S


class TriggerKind(StrEnum):
    OFFSET = "offset"
    TIME = "time"
    CPU = "cpu"
    TIME_CPU = "time+cpu"


class Scenario(StrEnum):
    STEP = "step"
    RAMP = "ramp"
    SPIKES = "spikes"
    MIXED = "mixed"


@dataclass(frozen=True)
class Group:
    """The consumer group: its partitions, each replica's capacity and its delays."""

    partitions: int = 12
    capacity_per_s: float = 1000.0
    startup_s: int = 30
    rebalance_s: float = 3.0
    min_replicas: int = 1
    max_replicas: int | None = None  # None: the partition count

    def __post_init__(self) -> None:
        for name in ("partitions", "min_replicas"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)}")
        if self.capacity_per_s <= 0:
            raise ValueError(f"capacity_per_s must be > 0, got {self.capacity_per_s}")
        if self.startup_s < 0 or self.rebalance_s < 0:
            raise ValueError(f"delays must be >= 0, got {self.startup_s}, {self.rebalance_s}")
        if self.max_replicas is not None and self.max_replicas < 1:
            raise ValueError(f"max_replicas must be an integer >= 1, got {self.max_replicas}")
        if self.min_replicas > self.ceiling:
            raise ValueError(f"min_replicas {self.min_replicas} > max {self.ceiling}")

    @property
    def ceiling(self) -> int:
        """The most replicas the autoscaler may ask for: never past the partition count."""
        return min(self.max_replicas or self.partitions, self.partitions)  # max >= 1 if set

    def drain_per_s(self, replicas: int) -> float:
        """Work a second at which the slowest partition's owner drains its backlog."""
        if replicas <= 0:
            return 0.0
        return self.capacity_per_s * self.partitions / math.ceil(self.partitions / replicas)


@dataclass(frozen=True)
class Policy:
    """The HPA's behaviour (the Kubernetes defaults)."""

    sync_s: int = 15
    tolerance: float = 0.1
    downscale_window_s: int = 300
    scale_up_pods: int = 4
    scale_up_percent: int = 100

    def __post_init__(self) -> None:
        if self.sync_s < 1:
            raise ValueError(f"sync_s must be an integer >= 1, got {self.sync_s}")


@dataclass(frozen=True)
class Trigger:
    """The metric(s) the HPA scales on, and their targets."""

    kind: TriggerKind
    lag_records: float | None = None  # per replica (lagThreshold); None: 5 s of cost-1 work
    time_lag_s: float = 5.0
    cpu_ratio: float = 0.7

    def __post_init__(self) -> None:
        for name in ("lag_records", "time_lag_s", "cpu_ratio"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")

    def lag_threshold(self, group: Group) -> float:
        return 5 * group.capacity_per_s if self.lag_records is None else self.lag_records


@dataclass(frozen=True)
class Trace:
    """Offered load: per tick, the records that arrive and their mean cost."""

    name: str
    counts: tuple[int, ...]
    costs: tuple[float, ...]
    start_replicas: int
    change_s: int = CHANGE_S


@dataclass(frozen=True)
class Result:
    scenario: str
    trigger: str
    catch_up_s: int | None
    worst_time_lag_s: float
    replica_minutes: float
    scale_changes: int
    peak_replicas: int
    final_replicas: int
    offered: int
    consumed: int
    backlog: int
    replicas: tuple[int, ...] = dataclasses.field(repr=False)  # pods asked for, per tick
    time_lag_s: tuple[float, ...] = dataclasses.field(repr=False)  # at the end of each tick

    def figures(self) -> dict[str, Any]:
        """The summary figures (no per-tick series), for JSON."""
        out = dataclasses.asdict(self)
        for name in ("scenario", "trigger", "replicas", "time_lag_s"):
            del out[name]
        out["worst_time_lag_s"] = round(self.worst_time_lag_s, 1)
        out["replica_minutes"] = round(self.replica_minutes, 1)
        return out


def hpa_desired(
    current: int, metric: float, target: float, tolerance: float = 0.1, total: bool = False
) -> int:
    """The HPA's proposal for one metric, before stabilisation, rate limits and clamping.

    Args:
        current: the replicas the ratio applies to (ready pods; all pods for ``total``).
        metric: the metric's value; with ``total``, summed over the group.
        target: the target value; with ``total``, the target per replica.
        tolerance: no change while the usage ratio is within this of 1.
        total: AverageValue semantics: desired = ceil(metric / target).
    """
    if current <= 0:
        return math.ceil(metric / target)
    ratio = metric / (target * current) if total else metric / target
    if abs(ratio - 1.0) <= tolerance:
        return current
    desired = metric / target if total else current * ratio
    # Rounded first so float noise (1.4 / 0.7 = 2.0000000000000004) does not add a pod.
    return math.ceil(round(desired, 9))


class _Autoscaler:
    """The HPA's scaling step: a proposal, stabilised and rate-limited, clamped."""

    def __init__(self, group: Group, policy: Policy, start: int) -> None:
        self.group, self.policy = group, policy
        self.proposals: deque[tuple[int, int]] = deque([(0, start)])  # (at_s, replicas)

    def scale(self, now: int, current: int, proposal: int) -> int:
        group, policy = self.group, self.policy
        proposal = min(max(proposal, group.min_replicas), group.ceiling)
        while self.proposals and self.proposals[0][0] <= now - policy.downscale_window_s:
            self.proposals.popleft()
        self.proposals.append((now, proposal))
        if proposal > current:
            step = max(current * policy.scale_up_percent // 100, policy.scale_up_pods)
            return min(proposal, current + step)
        return min(current, max(p for _, p in self.proposals))


class _Backlog:
    """Unconsumed records, oldest first, as ``[arrival_s, count, cost]`` chunks."""

    def __init__(self) -> None:
        self._chunks: deque[list[float]] = deque()
        self._head_done = 0.0  # work already spent on the oldest chunk
        self.offered = self.consumed = self.records = 0

    def offer(self, arrival_s: float, count: int, cost: float) -> None:
        if count:
            self._chunks.append([float(arrival_s), count, cost])
            self.offered += count
            self.records += count

    def drain(self, work: float) -> float:
        """Consume, oldest first, with up to ``work`` units; return the work spent."""
        budget = work
        while self._chunks and budget > 0:
            chunk = self._chunks[0]
            need = chunk[1] * chunk[2] - self._head_done
            if budget >= need:
                self._chunks.popleft()
                self._take(int(chunk[1]))
                self._head_done, budget = 0.0, budget - need
                continue
            # A record is consumed when its whole cost is done; the part done carries over.
            self._head_done += budget
            done = min(int(self._head_done // chunk[2]), int(chunk[1]) - 1)
            chunk[1] -= done
            self._head_done -= done * chunk[2]
            self._take(done)
            budget = 0.0
        return work - budget

    def _take(self, count: int) -> None:
        self.consumed += count
        self.records -= count

    def time_lag_s(self, now: float) -> float:
        return float(now) - self._chunks[0][0] if self._chunks else 0.0


def trace(scenario: Scenario | str, group: Group, seed: int = 1, duration_s: int = 600) -> Trace:
    """A scenario's offered load: Poisson-like counts around its rate, deterministic in seed."""
    scenario = Scenario(scenario)
    rng = random.Random(seed)

    def rate(t: int) -> float:  # records a second, in replicas' worth of cost-1 work
        after = t >= CHANGE_S
        if scenario is Scenario.STEP:
            return 5.0 if after else 2.0
        if scenario is Scenario.RAMP:
            return 1.0 + 4.5 * min(max(t - CHANGE_S, 0) / 240, 1.0)
        if scenario is Scenario.SPIKES:
            return 8.0 if after and t < CHANGE_S + 480 and (t - CHANGE_S) % 120 < 20 else 2.0
        return 1.25

    def heavy_share(t: int) -> float:  # of records, those that cost HEAVY_COST
        if scenario is not Scenario.MIXED:
            return 0.0
        return 0.25 if CHANGE_S <= t < CHANGE_S + 300 else 0.05

    counts, costs = [], []
    for t in range(duration_s):
        mean = rate(t) * group.capacity_per_s
        n = max(0, round(rng.gauss(mean, math.sqrt(mean))))
        share = heavy_share(t)
        heavy = round(rng.gauss(n * share, math.sqrt(n * share * (1 - share)))) if share else 0
        heavy = min(max(heavy, 0), n)
        counts.append(n)
        costs.append((n + heavy * (HEAVY_COST - 1)) / n if n else 1.0)
    base_work = rate(0) * (1 + heavy_share(0) * (HEAVY_COST - 1))  # in replicas
    start = min(max(math.ceil(round(base_work / 0.7, 9)), group.min_replicas), group.ceiling)
    return Trace(scenario.value, tuple(counts), tuple(costs), start)


def simulate(
    scenario: Scenario | str | Trace,
    trigger: Trigger | TriggerKind | str,
    group: Group | None = None,
    policy: Policy | None = None,
    seed: int = 1,
    duration_s: int = 600,
) -> Result:
    """Run one trigger on one scenario (or a given `Trace`) and summarise the run."""
    group = group or Group()
    policy = policy or Policy()
    load = scenario if isinstance(scenario, Trace) else trace(scenario, group, seed, duration_s)
    trigger = trigger if isinstance(trigger, Trigger) else Trigger(TriggerKind(trigger))
    kind, tolerance = trigger.kind, policy.tolerance
    hpa = _Autoscaler(group, policy, load.start_replicas)
    backlog = _Backlog()
    running = load.start_replicas
    starting: list[int] = []  # when each pod asked for begins to consume
    paused_until = 0.0
    busy: deque[tuple[float, float]] = deque(maxlen=policy.sync_s)  # (work done, capacity)
    changes = 0
    replicas: list[int] = []
    lags: list[float] = []
    for t, (count, cost) in enumerate(zip(load.counts, load.costs, strict=True)):
        ready = [s for s in starting if s <= t]
        if ready:
            running += len(ready)
            starting = starting[len(ready) :]  # in order: asked for in order, same delay
            paused_until = max(paused_until, t + group.rebalance_s)
        backlog.offer(t, count, cost)
        consuming_s = min(max(t + TICK_S - paused_until, 0.0), TICK_S)
        work = backlog.drain(group.drain_per_s(running) * consuming_s)
        busy.append((work, group.capacity_per_s * running * TICK_S))
        now = t + TICK_S
        lags.append(backlog.time_lag_s(now))
        current = running + len(starting)
        if now % policy.sync_s == 0:
            cpu = min(sum(w for w, _ in busy) / max(sum(c for _, c in busy), 1e-9), 1.0)
            proposals = []
            if kind is TriggerKind.OFFSET:
                lag_records, threshold = float(backlog.records), trigger.lag_threshold(group)
                proposals.append(hpa_desired(current, lag_records, threshold, tolerance, True))
            if kind in (TriggerKind.TIME, TriggerKind.TIME_CPU):
                proposals.append(hpa_desired(running, lags[-1], trigger.time_lag_s, tolerance))
            if kind in (TriggerKind.CPU, TriggerKind.TIME_CPU):
                proposals.append(hpa_desired(running, cpu, trigger.cpu_ratio, tolerance))
            new = hpa.scale(now, current, max(proposals))
            changes += int(new != current)
            if new > current:
                starting += [now + group.startup_s] * (new - current)
            elif new < current:
                # Pods still starting go first (the newest); then consuming ones, a rebalance.
                cut_running = max(current - new - len(starting), 0)
                starting = starting[: max(len(starting) - (current - new), 0)]
                if cut_running:
                    running -= cut_running
                    paused_until = max(paused_until, now + group.rebalance_s)
        replicas.append(running + len(starting))
    return Result(
        scenario=load.name,
        trigger=kind.value,
        catch_up_s=_catch_up_s(lags, load.change_s),
        worst_time_lag_s=max(lags, default=0.0),
        replica_minutes=sum(replicas) * TICK_S / 60,
        scale_changes=changes,
        peak_replicas=max(replicas, default=running),
        final_replicas=replicas[-1] if replicas else running,
        offered=backlog.offered,
        consumed=backlog.consumed,
        backlog=backlog.records,
        replicas=tuple(replicas),
        time_lag_s=tuple(lags),
    )


def _catch_up_s(lags: Sequence[float], change_s: int) -> int | None:
    """Seconds from ``change_s`` until the lag, once past the bound, is back within it."""
    behind = next((t for t in range(change_s, len(lags)) if lags[t] > CAUGHT_UP_LAG_S), None)
    if behind is None:
        return 0 if change_s < len(lags) else None
    back = next((t for t in range(behind, len(lags)) if lags[t] <= CAUGHT_UP_LAG_S), None)
    return None if back is None else back + TICK_S - change_s


def compare(
    scenarios: Sequence[Scenario | str] = tuple(Scenario),
    triggers: Sequence[TriggerKind | str] = tuple(TriggerKind),
    group: Group | None = None,
    policy: Policy | None = None,
    seed: int = 1,
    duration_s: int = 600,
) -> list[Result]:
    """Every trigger on every scenario; the triggers of a scenario see the same trace."""
    group = group or Group()
    results = []
    for scenario in scenarios:
        load = trace(scenario, group, seed, duration_s)
        results += [simulate(load, kind, group, policy) for kind in triggers]
    return results


COLUMNS = ("scenario", "trigger", "catch_up_s", "worst_lag_s", "replica_min", "changes", "peak",
           "final")  # fmt: skip


def format_table(results: Sequence[Result]) -> str:
    """``results`` as an aligned text table (catch-up ``never``: not back within the run)."""
    cells = [COLUMNS] + [
        (
            r.scenario,
            r.trigger,
            "never" if r.catch_up_s is None else str(r.catch_up_s),
            f"{r.worst_time_lag_s:.1f}",
            f"{r.replica_minutes:.1f}",
            str(r.scale_changes),
            str(r.peak_replicas),
            str(r.final_replicas),
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = []
    for row in cells:
        padded = [c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(row)]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def summary(results: Sequence[Result], group: Group, seed: int, duration_s: int) -> dict[str, Any]:
    """All figures as ``results[scenario][trigger]``, with the settings that produced them."""
    nested: dict[str, dict[str, Any]] = {}
    for r in results:
        nested.setdefault(r.scenario, {})[r.trigger] = r.figures()
    return {"partitions": group.partitions, "capacity_per_s": group.capacity_per_s,
            "startup_s": group.startup_s, "rebalance_s": group.rebalance_s, "seed": seed,
            "duration_s": duration_s, "results": nested}  # fmt: skip
