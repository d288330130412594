"""Live-traffic experiments for a model: what splits its traffic, what it mirrors, and what
guards a canary, read from ``<model_dir>/<model>/experiment.json`` and reloaded while running.

An experiment is validated in full at the edge (`parse`): every mistake names its field, and a
config that does not validate never replaces the one in force.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import SluiceError

log = logging.getLogger(__name__)

FILE_NAME = "experiment.json"
MAX_FILE_BYTES = 65_536
MAX_VARIANTS = 8
# The guard keeps at most this many finished requests per variant (pipeline/experiments/guard.py),
# so a larger min_requests could never be met.
MAX_WINDOW_REQUESTS = 50_000
NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,31}"  # a Prometheus label value: short and bounded
_NAME = re.compile(NAME_PATTERN)
_MAX_SHOWN_CHARS = 60


class ExperimentError(SluiceError, ValueError):
    """An experiment config sluice cannot use; ``field`` is the dotted path of the culprit
    (``variants[1].weight``), empty for the file as a whole."""

    def __init__(self, field: str, reason: str, *, model: str | None = None) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason
        self.model = model


@dataclass(frozen=True)
class Variant:
    """A share of a model's traffic served by one of its versions; ``weight`` is relative."""

    name: str
    version: str
    weight: float


@dataclass(frozen=True)
class Shadow:
    """A version that gets a copy of ``share`` (in (0, 1]) of the traffic; its answers are
    never sent."""

    name: str
    version: str
    share: float


@dataclass(frozen=True)
class Guard:
    """When to roll the canary back: over the last ``window_s``, with at least
    ``min_requests`` finished requests on both variants, its error rate exceeds the baseline's
    by more than ``max_error_rate_delta``, or its p99 latency exceeds
    ``baseline_p99 * max_p99_ratio + max_p99_delta_ms``, or (when ``max_p50_ratio`` is set)
    its median exceeds ``baseline_p50 * max_p50_ratio + max_p50_delta_ms``.

    Why a median too: on one worker a slow canary's batches hold up the baseline's requests
    queued behind them, which lifts the baseline's tail with the canary's; the median shows
    the canary's own cost."""

    canary: str
    baseline: str
    window_s: float = 60.0
    min_requests: int = 100
    max_error_rate_delta: float = 0.05
    max_p99_ratio: float = 1.5
    max_p99_delta_ms: float = 0.0
    max_p50_ratio: float = 0.0  # 0: the median is not compared
    max_p50_delta_ms: float = 0.0


@dataclass(frozen=True)
class Experiment:
    """The experiment in force for one model.

    ``fingerprint`` identifies the config it was parsed from (the same in every process that
    read the same config); runtime overrides such as a rollback keep it.
    """

    model: str
    variants: tuple[Variant, ...]
    shadow: Shadow | None
    guard: Guard | None
    fingerprint: str

    @property
    def active(self) -> tuple[Variant, ...]:
        """The variants that take traffic (weight > 0), in config order."""
        return tuple(v for v in self.variants if v.weight > 0)

    def with_weight(self, name: str, weight: float) -> Experiment:
        """This experiment with variant ``name`` at ``weight`` (relative, like the others).

        Raises:
            ExperimentError: no such variant, a weight that is not a finite number >= 0, or
                one that would leave every variant at 0.
        """
        names = [v.name for v in self.variants]
        if name not in names:
            raise ExperimentError(
                "variants", f"no variant named {_show(name)}; known: {', '.join(names)}",
                model=self.model,
            )  # fmt: skip
        value = _number(weight, f"variants[{names.index(name)}].weight", self.model)
        variants = tuple(
            dataclasses.replace(v, weight=value) if v.name == name else v for v in self.variants
        )
        if not any(v.weight > 0 for v in variants):
            raise ExperimentError(
                "variants", f"{name} at weight 0 would leave no variant any traffic",
                model=self.model,
            )  # fmt: skip
        return dataclasses.replace(self, variants=variants)


def parse(model: str, data: object, versions: Sequence[str]) -> Experiment:
    """Validate a decoded ``experiment.json`` for ``model``, whose known versions are
    ``versions``; weights are stored normalised to sum 1.

    Raises:
        ExperimentError: the first violation found, naming its field.
    """
    obj = _object(data, "", ("variants", "shadow", "guard"), model)
    raw = obj.get("variants")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_VARIANTS:
        raise ExperimentError(
            "variants",
            f"must be a non-empty list of at most {MAX_VARIANTS} variants, got {_show(raw)}",
            model=model,
        )
    known = list(versions)
    seen: dict[str, str] = {}
    variants = []
    for i, item in enumerate(raw):
        path = f"variants[{i}]"
        entry = _object(item, path, ("name", "version", "weight"), model)
        name = _name(entry, path, seen, model)
        version = _version(entry, path, known, model)
        weight = _number(_required(entry, path, "weight", model), f"{path}.weight", model)
        variants.append(Variant(name, version, weight))
    total = math.fsum(v.weight for v in variants)
    if not math.isfinite(total) or total <= 0:
        weights = ", ".join(f"{v.weight:g}" for v in variants)
        raise ExperimentError(
            "variants", f"the weights must sum to a finite number > 0, got {weights}", model=model
        )
    # 12 significant digits: 90/10, 0.9/0.1 and 0.7/0.2/0.1 (whose float sum is not 1) normalise
    # to the same numbers, and so to the same fingerprint.
    variants = [dataclasses.replace(v, weight=float(f"{v.weight / total:.12g}")) for v in variants]
    shadow = None
    if obj.get("shadow") is not None:
        entry = _object(obj["shadow"], "shadow", ("name", "version", "share"), model)
        shadow = Shadow(
            _name(entry, "shadow", seen, model),
            _version(entry, "shadow", known, model),
            _number(_required(entry, "shadow", "share", model), "shadow.share", model,
                    maximum=1.0, open_minimum=True),
        )  # fmt: skip
    guard = None
    if obj.get("guard") is not None:
        guard = _guard(obj["guard"], [v.name for v in variants], model)
    return Experiment(model, tuple(variants), shadow, guard, _fingerprint(variants, shadow, guard))


def load(model: str, path: Path, versions: Sequence[str]) -> Experiment:
    """Read, decode and `parse` the experiment file at ``path``.

    Raises:
        ExperimentError: on field ``""`` for a file that cannot be read, is larger than
            ``MAX_FILE_BYTES`` or is not JSON (the decoder's message gives line and column);
            else as `parse`.
    """
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)  # bounded even if the file grows meanwhile
    except OSError as exc:
        raise ExperimentError("", f"cannot read the file: {exc}", model=model) from exc
    if len(raw) > MAX_FILE_BYTES:
        raise ExperimentError(
            "", f"the file is larger than the {MAX_FILE_BYTES:,} bytes allowed", model=model
        )
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ExperimentError("", f"the file is not UTF-8: {exc}", model=model) from exc
    except json.JSONDecodeError as exc:
        raise ExperimentError("", f"the file is not valid JSON: {exc}", model=model) from exc
    return parse(model, data, versions)


class Experiments:
    """The experiments in force for every model of a model directory, reloaded while running.

    One writer (the engine loop calls `maybe_reload` once per batch and `rollback` on the
    guard's decision) and readers in the same thread: entries are swapped as whole immutable
    `Experiment` objects, so no lock is needed.
    """

    def __init__(
        self,
        model_dir: Path,
        versions: Callable[[str], Sequence[str]],
        names: Callable[[], Sequence[str]],
        reload_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not _is_number(reload_s) or not reload_s >= 0:
            raise ValueError(f"reload_s must be a number of seconds >= 0, got {reload_s!r}")
        self._model_dir = model_dir
        self._versions = versions
        self._names = names
        self._reload_s = float(reload_s)
        self._clock = clock
        self._next_reload_at = -math.inf
        self._in_force: dict[str, Experiment] = {}
        # What each model's file looked like when last parsed (well or not), with the versions
        # it was checked against: a new model version can make a refused config valid.
        self._seen: dict[str, tuple[int, int, tuple[str, ...]]] = {}

    def get(self, model: str) -> Experiment | None:
        """The experiment in force for ``model``, if any (a dict lookup: call it per request)."""
        return self._in_force.get(model)

    def all(self) -> list[Experiment]:
        """The experiments in force, by model name."""
        return [self._in_force[model] for model in sorted(self._in_force)]

    def maybe_reload(self, force: bool = False) -> list[ExperimentError]:
        """Pick up changed, new and removed experiment files, at most once per ``reload_s``
        unless ``force``; a file that does not validate leaves the experiment in force.

        Returns:
            The errors found by this call.
        """
        now = self._clock()
        if not force and now < self._next_reload_at:
            return []
        self._next_reload_at = now + self._reload_s
        errors: list[ExperimentError] = []
        names = set(self._names())
        for model in sorted(names):
            error = self._reload_one(model)
            if error is not None:
                errors.append(error)
        for model in sorted(set(self._in_force) - names):
            self._forget(model, "its model is gone")
        return errors

    def rollback(self, model: str, variant: str, fingerprint: str) -> bool:
        """Set ``variant``'s weight to 0 in ``model``'s experiment if ``fingerprint`` is the
        one in force. It stays at 0 while the file's content does not change (a reload of the
        same config keeps the experiment in force as it is); a changed config replaces it.

        Returns:
            Whether it applied: not for another fingerprint, an unknown variant, one already
            at 0, or the last variant with traffic.
        """
        experiment = self._in_force.get(model)
        if experiment is None or experiment.fingerprint != fingerprint:
            return False
        current = {v.name: v for v in experiment.variants}.get(variant)
        if current is None or current.weight <= 0:
            return False
        if all(v.name == variant for v in experiment.active):
            log.warning(
                "experiment for %s: not rolling back %s, the last variant with traffic",
                model, variant,
            )  # fmt: skip
            return False
        self._in_force[model] = experiment.with_weight(variant, 0.0)
        log.warning("experiment for %s: rolled back %s (weight 0, fingerprint %s)",
                    model, variant, fingerprint)  # fmt: skip
        return True

    def _reload_one(self, model: str) -> ExperimentError | None:
        path = self._model_dir / model / FILE_NAME
        try:
            st = path.stat()
        except FileNotFoundError:
            self._seen.pop(model, None)
            if model in self._in_force:
                self._forget(model, f"{path} was removed")
            return None
        except OSError as exc:
            error = ExperimentError("", f"cannot stat the file: {exc}", model=model)
            log.error("%s: %s (the experiment in force is kept)", path, error)
            return error
        versions = tuple(self._versions(model))
        stamp = (st.st_mtime_ns, st.st_size, versions)
        if self._seen.get(model) == stamp:
            return None
        self._seen[model] = stamp
        try:
            experiment = load(model, path, versions)
        except ExperimentError as error:
            log.error("%s: %s (the experiment in force is kept)", path, error)
            return error
        previous = self._in_force.get(model)
        if previous is not None and previous.fingerprint == experiment.fingerprint:
            return None  # touched, not changed: keep the one in force, rollbacks included
        # A new config: the operator decided again, so rollbacks of the old one do not apply.
        self._in_force[model] = experiment
        log.info("experiment for %s: %s", model, describe(experiment))
        return None

    def _forget(self, model: str, why: str) -> None:
        self._in_force.pop(model, None)
        self._seen.pop(model, None)
        log.info("experiment for %s: none (%s)", model, why)


def describe(experiment: Experiment) -> str:
    """One line for the log: ``variants a@1=0.9, b@2=0.1; shadow s@3 share 0.2; guard b vs a
    (fingerprint ...)``, variants as name@version=weight."""
    variants = ", ".join(f"{v.name}@{v.version}={v.weight:.4g}" for v in experiment.variants)
    parts = [f"variants {variants}"]
    if experiment.shadow is not None:
        s = experiment.shadow
        parts.append(f"shadow {s.name}@{s.version} share {s.share:g}")
    if experiment.guard is not None:
        parts.append(f"guard {experiment.guard.canary} vs {experiment.guard.baseline}")
    return "; ".join(parts) + f" (fingerprint {experiment.fingerprint})"


def _fingerprint(variants: Sequence[Variant], shadow: Shadow | None, guard: Guard | None) -> str:
    canonical = {
        "variants": [dataclasses.asdict(v) for v in variants],
        "shadow": dataclasses.asdict(shadow) if shadow is not None else None,
        "guard": dataclasses.asdict(guard) if guard is not None else None,
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _guard(data: object, variants: list[str], model: str) -> Guard:
    fields = [f.name for f in dataclasses.fields(Guard)]
    entry = _object(data, "guard", fields, model)
    roles: dict[str, str] = {}
    for role in ("canary", "baseline"):
        value = _required(entry, "guard", role, model)
        if value not in variants:
            raise ExperimentError(
                f"guard.{role}",
                f"must name a variant ({', '.join(variants)}), got {_show(value)}",
                model=model,
            )
        roles[role] = str(value)
    if roles["canary"] == roles["baseline"]:
        raise ExperimentError(
            "guard.baseline", f"must differ from guard.canary, got {_show(roles['baseline'])}",
            model=model,
        )  # fmt: skip
    min_requests = entry.get("min_requests", Guard.min_requests)
    if (
        not isinstance(min_requests, int)
        or isinstance(min_requests, bool)
        or not 1 <= min_requests <= MAX_WINDOW_REQUESTS
    ):
        raise ExperimentError(
            "guard.min_requests",
            f"must be an integer in [1, {MAX_WINDOW_REQUESTS}], got {_show(min_requests)}",
            model=model,
        )
    return Guard(
        canary=roles["canary"],
        baseline=roles["baseline"],
        window_s=_number(
            entry.get("window_s", Guard.window_s),
            "guard.window_s",
            model,
            minimum=1.0,
            maximum=3600.0,
            unit=" of seconds",
        ),
        min_requests=min_requests,
        max_error_rate_delta=_number(
            entry.get("max_error_rate_delta", Guard.max_error_rate_delta),
            "guard.max_error_rate_delta",
            model,
        ),
        max_p99_ratio=_number(
            entry.get("max_p99_ratio", Guard.max_p99_ratio),
            "guard.max_p99_ratio",
            model,
            minimum=1.0,
        ),
        max_p99_delta_ms=_number(
            entry.get("max_p99_delta_ms", Guard.max_p99_delta_ms),
            "guard.max_p99_delta_ms",
            model,
            unit=" of milliseconds",
        ),
        max_p50_ratio=_p50_ratio(entry.get("max_p50_ratio", Guard.max_p50_ratio), model),
        max_p50_delta_ms=_number(
            entry.get("max_p50_delta_ms", Guard.max_p50_delta_ms),
            "guard.max_p50_delta_ms",
            model,
            unit=" of milliseconds",
        ),
    )


def _p50_ratio(value: object, model: str) -> float:
    """0 (off), or a ratio of at least 1."""
    if value == 0 and not isinstance(value, bool):
        return 0.0
    return _number(value, "guard.max_p50_ratio", model, minimum=1.0)


def _object(data: object, path: str, keys: Sequence[str], model: str) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        where = path or "the experiment"
        raise ExperimentError(
            path, f"{where} must be a JSON object, got {_show(data)}", model=model
        )
    for key in data:
        if key not in keys:
            raise ExperimentError(
                f"{path}.{key}" if path else str(key),
                f"unknown key; known: {', '.join(sorted(keys))}",
                model=model,
            )
    return data


def _required(entry: Mapping[str, Any], path: str, key: str, model: str) -> object:
    if key not in entry:
        raise ExperimentError(f"{path}.{key}", "is required", model=model)
    return entry[key]


def _name(entry: Mapping[str, Any], path: str, seen: dict[str, str], model: str) -> str:
    field = f"{path}.name"
    name = _required(entry, path, "name", model)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ExperimentError(
            field, f"must be a string matching ^{NAME_PATTERN}$, got {_show(name)}", model=model
        )
    if name in seen:
        raise ExperimentError(field, f"duplicate name {name!r} (also {seen[name]})", model=model)
    seen[name] = field
    return name


def _version(entry: Mapping[str, Any], path: str, known: list[str], model: str) -> str:
    version = _required(entry, path, "version", model)
    if not isinstance(version, str) or version not in known:
        raise ExperimentError(
            f"{path}.version",
            f"must be a version of model {model} (known: {known}), got {_show(version)}",
            model=model,
        )
    return version


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(
    value: object,
    field: str,
    model: str | None,
    *,
    minimum: float = 0.0,
    maximum: float = math.inf,
    open_minimum: bool = False,
    unit: str = "",
) -> float:
    """``value`` as a finite float in the range given, else an error naming ``field``."""
    low = f"{minimum:g}"
    if maximum < math.inf:
        bounds = f"in {'(' if open_minimum else '['}{low}, {maximum:g}]"
    else:
        bounds = f"{'>' if open_minimum else '>='} {low}"
    if not _is_number(value):
        raise ExperimentError(field, f"must be a number{unit} {bounds}, got {_show(value)}",
                              model=model)  # fmt: skip
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:  # an integer beyond any float
        number = math.inf
    if not math.isfinite(number):
        raise ExperimentError(field, f"must be a finite number{unit} {bounds}, got {_show(value)}",
                              model=model)  # fmt: skip
    if number < minimum or (open_minimum and number == minimum) or number > maximum:
        raise ExperimentError(field, f"must be a number{unit} {bounds}, got {_show(value)}",
                              model=model)  # fmt: skip
    return number


def _show(value: object) -> str:
    """``repr(value)``, cut short: error messages end up in logs and events."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN_CHARS else text[: _MAX_SHOWN_CHARS - 3] + "..."
