"""Experiment configs: every validation rule names its field, weights are relative, the
fingerprint pins the config, and `Experiments` reloads files and keeps rollbacks."""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import SluiceError
from pipeline.experiments import Experiment, ExperimentError, Experiments, Guard, load, parse

VERSIONS = ["1", "2", "3"]

CONFIG: dict[str, Any] = {
    "variants": [
        {"name": "a", "version": "1", "weight": 90},
        {"name": "b", "version": "2", "weight": 10},
    ],
    "shadow": {"name": "s", "version": "3", "share": 0.2},
    "guard": {
        "canary": "b",
        "baseline": "a",
        "window_s": 30,
        "min_requests": 200,
        "max_error_rate_delta": 0.02,
        "max_p99_ratio": 1.5,
        "max_p99_delta_ms": 5,
    },
}


def config(edit: Callable[[dict[str, Any]], object] | None = None) -> dict[str, Any]:
    data = copy.deepcopy(CONFIG)
    if edit is not None:
        edit(data)
    return data


def put(*path: str | int, **values: object) -> Callable[[dict[str, Any]], object]:
    """An edit that sets ``values`` in the object at ``path``."""

    def edit(data: dict[str, Any]) -> None:
        target: Any = data
        for step in path:
            target = target[step]
        target.update(values)

    return edit


def drop(*path: str | int) -> Callable[[dict[str, Any]], object]:
    """An edit that removes the key at ``path``."""

    def edit(data: dict[str, Any]) -> None:
        target: Any = data
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]

    return edit


BAD = [
    # (what is wrong, the edit, the field named, a fragment of the message)
    ("unknown top-level key", put(colour="red"), "colour", "unknown key"),
    ("variants missing", drop("variants"), "variants", "non-empty list"),
    ("no variants", put(variants=[]), "variants", "non-empty list"),
    (
        "nine variants",
        put(variants=[{"name": f"v{i}", "version": "1", "weight": 1} for i in range(9)]),
        "variants",
        "at most 8",
    ),
    ("variant not an object", put(variants=["a"]), "variants[0]", "JSON object"),
    (
        "unknown variant key",
        put("variants", 0, colour=1),
        "variants[0].colour",
        "known: name, version, weight",
    ),
    ("upper-case name", put("variants", 0, name="A"), "variants[0].name", "matching"),
    ("name too long", put("variants", 0, name="a" * 33), "variants[0].name", "matching"),
    ("name with a newline", put("variants", 0, name="a\n"), "variants[0].name", "matching"),
    ("name not a string", put("variants", 0, name=7), "variants[0].name", "got 7"),
    (
        "duplicate name",
        put("variants", 1, name="a"),
        "variants[1].name",
        "duplicate name 'a' (also variants[0].name)",
    ),
    ("shadow named like a variant", put("shadow", name="b"), "shadow.name", "duplicate"),
    (
        "unknown version",
        put("variants", 1, version="9"),
        "variants[1].version",
        "known: ['1', '2', '3']",
    ),
    (
        "version not a string",
        put("variants", 1, version=2),
        "variants[1].version",
        "known: ['1', '2', '3']",
    ),
    ("weight missing", drop("variants", 0, "weight"), "variants[0].weight", "is required"),
    (
        "negative weight",
        put("variants", 1, weight=-3),
        "variants[1].weight",
        "must be a number >= 0, got -3",
    ),
    ("bool weight", put("variants", 0, weight=True), "variants[0].weight", "got True"),
    ("string weight", put("variants", 0, weight="90"), "variants[0].weight", "got '90'"),
    ("infinite weight", put("variants", 0, weight=float("inf")), "variants[0].weight", "finite"),
    ("NaN weight", put("variants", 0, weight=float("nan")), "variants[0].weight", "finite"),
    (
        "integer weight beyond any float",
        put("variants", 0, weight=10**400),
        "variants[0].weight",
        "finite",
    ),
    (
        "all weights 0",
        put(
            variants=[
                {"name": "a", "version": "1", "weight": 0},
                {"name": "b", "version": "2", "weight": 0.0},
            ]
        ),
        "variants",
        "sum to a finite number > 0",
    ),
    ("shadow share 0", put("shadow", share=0), "shadow.share", "in (0, 1]"),
    ("shadow share 1.5", put("shadow", share=1.5), "shadow.share", "in (0, 1]"),
    ("shadow without share", drop("shadow", "share"), "shadow.share", "is required"),
    ("unknown shadow key", put("shadow", weight=1), "shadow.weight", "unknown key"),
    (
        "canary is not a variant",
        put("guard", canary="s"),
        "guard.canary",
        "must name a variant (a, b), got 's'",
    ),
    ("baseline missing", drop("guard", "baseline"), "guard.baseline", "is required"),
    (
        "canary is the baseline",
        put("guard", baseline="b"),
        "guard.baseline",
        "must differ from guard.canary",
    ),
    ("window too short", put("guard", window_s=0.5), "guard.window_s", "in [1, 3600], got 0.5"),
    ("window too long", put("guard", window_s=3601), "guard.window_s", "in [1, 3600]"),
    (
        "min_requests 0",
        put("guard", min_requests=0),
        "guard.min_requests",
        "integer in [1, 50000], got 0",
    ),
    ("fractional min_requests", put("guard", min_requests=1.5), "guard.min_requests", "got 1.5"),
    (
        "negative error-rate delta",
        put("guard", max_error_rate_delta=-0.1),
        "guard.max_error_rate_delta",
        ">= 0",
    ),
    (
        "p99 ratio below 1",
        put("guard", max_p99_ratio=0.9),
        "guard.max_p99_ratio",
        "must be a number >= 1, got 0.9",
    ),
    ("negative p99 delta", put("guard", max_p99_delta_ms=-1), "guard.max_p99_delta_ms", ">= 0"),
    ("unknown guard key", put("guard", max_p95_ratio=2), "guard.max_p95_ratio", "unknown key"),
]


@pytest.mark.parametrize(
    ("edit", "field", "fragment"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_each_violation_names_its_field(
    edit: Callable[[dict[str, Any]], object], field: str, fragment: str
) -> None:
    with pytest.raises(ExperimentError) as info:
        parse("m", config(edit), VERSIONS)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert fragment in str(info.value)
    assert info.value.model == "m"


def test_the_error_is_a_value_error_and_a_sluice_error() -> None:
    with pytest.raises(ValueError):
        parse("m", config(put(variants=[])), VERSIONS)
    assert issubclass(ExperimentError, SluiceError)


def test_the_top_level_must_be_an_object() -> None:
    with pytest.raises(ExperimentError, match="must be a JSON object, got") as info:
        parse("m", [CONFIG], VERSIONS)
    assert info.value.field == ""


def test_a_valid_config_parses_with_its_defaults() -> None:
    minimal = {
        "variants": [{"name": "a", "version": "1", "weight": 3}],
        "guard": None,
    }
    experiment = parse("m", minimal, VERSIONS)
    assert experiment.shadow is None and experiment.guard is None
    assert [v.name for v in experiment.variants] == ["a"]
    assert experiment.variants[0].weight == pytest.approx(1.0, rel=1e-12)
    full = parse("m", config(), VERSIONS)
    assert full.guard is not None
    assert full.guard.min_requests == 200
    assert full.guard.window_s == pytest.approx(30.0, rel=1e-12)
    assert full.shadow is not None and full.shadow.share == pytest.approx(0.2, rel=1e-12)


def test_weights_are_relative_and_stored_normalised() -> None:
    percent = parse("m", config(), VERSIONS)
    fraction = parse(
        "m",
        config(lambda d: (put("variants", 0, weight=0.9)(d), put("variants", 1, weight=0.1)(d))),
        VERSIONS,
    )
    assert [v.weight for v in percent.variants] == pytest.approx([0.9, 0.1], rel=1e-12)
    assert [v.weight for v in fraction.variants] == pytest.approx([0.9, 0.1], rel=1e-12)
    assert percent.fingerprint == fraction.fingerprint


def test_a_split_whose_float_sum_is_not_one_has_the_fingerprint_of_its_percentages() -> None:
    # 0.7 + 0.2 + 0.1 is 0.9999999999999999 in floats: normalising must not leak that into the
    # fingerprint, or two spellings of one split would be two configs.
    def three(weights: tuple[float, ...]) -> Experiment:
        variants = [
            {"name": n, "version": "1", "weight": w} for n, w in zip("abc", weights, strict=True)
        ]
        return parse("m", {"variants": variants}, VERSIONS)

    assert three((0.7, 0.2, 0.1)).fingerprint == three((70, 20, 10)).fingerprint
    assert sum(v.weight for v in three((0.7, 0.2, 0.1)).variants) == pytest.approx(1.0, abs=1e-9)


def test_guard_defaults_fill_in_and_count_in_the_fingerprint() -> None:
    explicit = config(
        put(guard={"canary": "b", "baseline": "a", "window_s": 60, "min_requests": 100})
    )
    implicit = config(put(guard={"canary": "b", "baseline": "a"}))
    assert parse("m", explicit, VERSIONS).fingerprint == parse("m", implicit, VERSIONS).fingerprint
    assert parse("m", implicit, VERSIONS).guard == Guard("b", "a")


def test_the_fingerprint_is_pinned() -> None:
    # Workers of different sluice releases share rollback events keyed by fingerprint during a
    # rolling update: the canonical form must not drift. Changing it is a breaking change.
    experiment = parse("m", config(), VERSIONS)
    assert experiment.fingerprint == "e6fde5631c01f6df"
    assert len(experiment.fingerprint) == 16
    assert parse("other-model", config(), VERSIONS).fingerprint == experiment.fingerprint


CHANGES = [
    lambda d: (put("variants", 0, name="a2")(d), put("guard", baseline="a2")(d)),
    put("variants", 0, version="3"),
    put("variants", 0, weight=80),
    lambda d: d["variants"].reverse(),
    put("shadow", share=0.3),
    put("shadow", version="2"),
    put("shadow", name="t"),
    drop("shadow"),
    drop("guard"),
    put("guard", canary="a", baseline="b"),
    put("guard", window_s=31),
    put("guard", min_requests=201),
    put("guard", max_error_rate_delta=0.03),
    put("guard", max_p99_ratio=2),
    put("guard", max_p99_delta_ms=6),
]


def test_the_fingerprint_changes_with_any_field() -> None:
    prints = [parse("m", config(change), VERSIONS).fingerprint for change in CHANGES]
    prints.append(parse("m", config(), VERSIONS).fingerprint)
    assert len(set(prints)) == len(prints)


def test_with_weight_is_an_override_of_the_same_config() -> None:
    experiment = parse("m", config(), VERSIONS)
    rolled = experiment.with_weight("b", 0)
    assert rolled.fingerprint == experiment.fingerprint
    assert [v.name for v in rolled.active] == ["a"]
    assert [v.name for v in experiment.active] == ["a", "b"]  # the original is untouched
    with pytest.raises(ExperimentError, match="no variant named 'z'"):
        experiment.with_weight("z", 1)
    with pytest.raises(ExperimentError, match="variants\\[1\\].weight: must be a number >= 0"):
        experiment.with_weight("b", -1)
    with pytest.raises(ExperimentError, match="no variant any traffic"):
        rolled.with_weight("a", 0)


# -- load ---------------------------------------------------------------------------------


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps(CONFIG))
    assert load("m", path, VERSIONS) == parse("m", config(), VERSIONS)


def test_load_refuses_a_file_over_64_kib(tmp_path: Path) -> None:
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps(CONFIG) + " " * 65_536)
    with pytest.raises(ExperimentError, match="larger than the 65,536 bytes") as info:
        load("m", path, VERSIONS)
    assert info.value.field == ""


def test_load_reports_bad_json_with_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "experiment.json"
    path.write_text('{\n  "variants": [,]\n}\n')
    with pytest.raises(ExperimentError, match="not valid JSON: .* line 2 column 16") as info:
        load("m", path, VERSIONS)
    assert info.value.field == ""


@pytest.mark.parametrize("content", [b"\xff\xfe{}", None], ids=["not utf-8", "missing"])
def test_load_reports_an_unreadable_file_on_the_whole(
    tmp_path: Path, content: bytes | None
) -> None:
    path = tmp_path / "experiment.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ExperimentError) as info:
        load("m", path, VERSIONS)
    assert info.value.field == ""


# -- Experiments ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Directory:
    """A model directory with models m and n, and the experiments over it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models = ["m", "n"]
        self.versions = {"m": list(VERSIONS), "n": ["1"]}
        self.clock = Clock()
        self.mtime_ns = 1_700_000_000_000_000_000
        for model in self.models:
            (root / model).mkdir()
        self.experiments = Experiments(
            root, lambda m: self.versions[m], lambda: self.models, reload_s=2.0, clock=self.clock
        )

    def write(self, data: object, model: str = "m") -> None:
        path = self.root / model / "experiment.json"
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        self.touch(model)

    def touch(self, model: str = "m") -> None:
        # An explicit, distinct mtime each time: the file system's own may not have moved.
        self.mtime_ns += 1_000_000_000
        os.utime(self.root / model / "experiment.json", ns=(self.mtime_ns, self.mtime_ns))

    def reload(self, after_s: float = 2.0) -> list[ExperimentError]:
        self.clock.now += after_s
        return self.experiments.maybe_reload()


@pytest.fixture
def directory(tmp_path: Path) -> Directory:
    return Directory(tmp_path)


def test_nothing_is_in_force_before_the_first_reload(directory: Directory) -> None:
    directory.write(CONFIG)
    assert directory.experiments.get("m") is None
    assert directory.experiments.maybe_reload() == []
    assert directory.experiments.get("m") == parse("m", config(), VERSIONS)
    assert directory.experiments.get("n") is None
    assert directory.experiments.all() == [parse("m", config(), VERSIONS)]


def test_a_changed_file_is_picked_up_only_after_reload_s(
    directory: Directory, caplog: pytest.LogCaptureFixture
) -> None:
    directory.write(CONFIG)
    directory.experiments.maybe_reload()
    changed = config(put("variants", 1, weight=30))
    directory.write(changed)
    assert directory.reload(after_s=1.9) == []
    assert directory.experiments.get("m") == parse("m", config(), VERSIONS)
    with caplog.at_level(logging.INFO, logger="pipeline.experiments.config"):
        assert directory.reload(after_s=0.1) == []
    new = directory.experiments.get("m")
    assert new == parse("m", changed, VERSIONS)
    assert new is not None
    assert "experiment for m: variants a@1=0.75, b@2=0.25" in caplog.text
    assert f"(fingerprint {new.fingerprint})" in caplog.text


def test_force_reloads_at_once(directory: Directory) -> None:
    directory.experiments.maybe_reload()
    directory.write(CONFIG)
    assert directory.experiments.maybe_reload() == []
    assert directory.experiments.get("m") is None
    directory.experiments.maybe_reload(force=True)
    assert directory.experiments.get("m") is not None


def test_a_bad_edit_keeps_the_config_in_force(
    directory: Directory, caplog: pytest.LogCaptureFixture
) -> None:
    directory.write(CONFIG)
    directory.experiments.maybe_reload()
    directory.write(config(put("variants", 1, weight=-3)))
    with caplog.at_level(logging.ERROR, logger="pipeline.experiments.config"):
        errors = directory.reload()
    assert [(e.model, e.field) for e in errors] == [("m", "variants[1].weight")]
    assert directory.experiments.get("m") == parse("m", config(), VERSIONS)
    assert str(directory.root / "m" / "experiment.json") in caplog.text
    assert "variants[1].weight: must be a number >= 0, got -3" in caplog.text
    # The same bad file is not parsed (nor logged) again until it changes.
    assert directory.reload() == []
    directory.write("{not json")
    assert [e.field for e in directory.reload()] == [""]
    assert directory.experiments.get("m") == parse("m", config(), VERSIONS)


def test_a_new_model_version_can_make_a_refused_config_valid(directory: Directory) -> None:
    uses_4 = config(put("variants", 1, version="4"))
    directory.write(uses_4)
    assert [e.field for e in directory.reload()] == ["variants[1].version"]
    directory.versions["m"].append("4")
    assert directory.reload() == []  # the file did not change; the versions did
    assert directory.experiments.get("m") == parse("m", uses_4, [*VERSIONS, "4"])


def test_a_removed_file_or_model_removes_the_experiment(directory: Directory) -> None:
    directory.write(CONFIG, "m")
    directory.write({"variants": [{"name": "x", "version": "1", "weight": 1}]}, "n")
    directory.reload()
    assert directory.experiments.get("m") is not None
    (directory.root / "m" / "experiment.json").unlink()
    directory.reload()
    assert directory.experiments.get("m") is None
    assert directory.experiments.get("n") is not None
    directory.models.remove("n")
    directory.reload()
    assert directory.experiments.get("n") is None
    assert directory.experiments.all() == []


def test_a_rollback_applies_to_its_fingerprint_only(directory: Directory) -> None:
    directory.write(CONFIG)
    directory.reload()
    experiment = directory.experiments.get("m")
    assert experiment is not None
    assert not directory.experiments.rollback("m", "b", "0123456789abcdef")
    assert not directory.experiments.rollback("n", "b", experiment.fingerprint)
    assert not directory.experiments.rollback("m", "z", experiment.fingerprint)
    assert directory.experiments.get("m") is experiment
    assert directory.experiments.rollback("m", "b", experiment.fingerprint)
    rolled = directory.experiments.get("m")
    assert rolled is not None
    assert rolled.fingerprint == experiment.fingerprint
    assert [v.name for v in rolled.active] == ["a"]
    # Already at 0: nothing applies again. The last variant with traffic is never rolled back.
    assert not directory.experiments.rollback("m", "b", experiment.fingerprint)
    assert not directory.experiments.rollback("m", "a", experiment.fingerprint)
    assert [v.name for v in directory.experiments.get("m").active] == ["a"]  # type: ignore[union-attr]


def test_a_rollback_survives_a_touch_and_ends_with_a_new_config(directory: Directory) -> None:
    directory.write(CONFIG)
    directory.reload()
    fingerprint = directory.experiments.get("m").fingerprint  # type: ignore[union-attr]
    assert directory.experiments.rollback("m", "b", fingerprint)
    directory.touch()  # same content, new mtime: re-parsed, same fingerprint
    assert directory.reload() == []
    directory.write(json.dumps(CONFIG, indent=2))  # reformatted: still the same config
    assert directory.reload() == []
    kept = directory.experiments.get("m")
    assert kept is not None and kept.fingerprint == fingerprint
    assert [v.name for v in kept.active] == ["a"]
    directory.write(config(put("variants", 1, weight=5)))
    directory.reload()
    new = directory.experiments.get("m")
    assert new is not None and new.fingerprint != fingerprint
    assert [v.name for v in new.active] == ["a", "b"]
    # The old config's rollback does not apply to the new one.
    assert not directory.experiments.rollback("m", "b", fingerprint)


def test_reload_s_must_be_a_duration(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reload_s must be a number of seconds >= 0, got -1"):
        Experiments(tmp_path, lambda m: [], lambda: [], reload_s=-1)
