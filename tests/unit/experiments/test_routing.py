"""Routing: a stable hash, splits that match the weights, sticky keys, and a shadow share
drawn independently of the variant."""

from __future__ import annotations

from collections import Counter

import pytest

from pipeline.experiments import (
    Experiment,
    ExperimentError,
    Variant,
    bucket,
    choose,
    mirrored,
    parse,
    routing_key,
)

VERSIONS = ["1", "2", "3"]
KEYS = [f"user-{i}" for i in range(20_000)]
# 20,000 keys drawn at p = 0.1 have a standard deviation of sqrt(0.1 * 0.9 / 20,000) = 0.21 %
# in their share; the hash is fixed, so the outcome is too, and 1.5 % is ~7 of those.
SHARE_ABS = 0.015


def experiment(*weights: float, share: float | None = 0.2) -> Experiment:
    names = "abcdefgh"
    data: dict[str, object] = {
        "variants": [
            {"name": names[i], "version": VERSIONS[i % 2], "weight": w}
            for i, w in enumerate(weights)
        ]
    }
    if share is not None:
        data["shadow"] = {"name": "s", "version": "3", "share": share}
    return parse("m", data, VERSIONS)


def shares(names: list[str]) -> dict[str, float]:
    return {name: count / len(names) for name, count in Counter(names).items()}


def test_bucket_is_in_the_unit_interval_and_deterministic() -> None:
    values = [bucket(key, "m") for key in KEYS[:2000]]
    assert all(0.0 <= v < 1.0 for v in values)
    assert values == [bucket(key, "m") for key in KEYS[:2000]]
    assert bucket("user-1", "m") != bucket("user-1", "n")


def test_bucket_is_pinned() -> None:
    # Stickiness across releases and restarts rests on this hash: were it to change, every key
    # would be re-drawn. (blake2b of "demo\0user-42", 8 bytes, is 7417e5edf8f57591.)
    assert bucket("user-42", "demo") == pytest.approx(0.45348965701938027, abs=1e-15)


def test_bucket_takes_any_string() -> None:
    assert 0.0 <= bucket("\udcff", "m") < 1.0  # a lone surrogate, as surrogateescape makes


def test_a_90_10_split_sends_90_percent_to_a() -> None:
    got = shares([choose(experiment(90, 10), key).name for key in KEYS])
    assert got["a"] == pytest.approx(0.9, abs=SHARE_ABS)
    assert got["b"] == pytest.approx(0.1, abs=SHARE_ABS)


def test_three_variants_split_by_their_relative_weights() -> None:
    got = shares([choose(experiment(5, 3, 2), key).name for key in KEYS])
    assert got["a"] == pytest.approx(0.5, abs=SHARE_ABS)
    assert got["b"] == pytest.approx(0.3, abs=SHARE_ABS)
    assert got["c"] == pytest.approx(0.2, abs=SHARE_ABS)


def test_choice_is_sticky() -> None:
    first = [choose(experiment(90, 10), key).name for key in KEYS[:2000]]
    again = [choose(experiment(0.9, 0.1), key).name for key in KEYS[:2000]]
    assert first == again
    assert first == [choose(experiment(90, 10), key).name for key in KEYS[:2000]]


def test_rolling_the_canary_back_moves_only_its_keys() -> None:
    before = experiment(90, 10)
    after = before.with_weight("b", 0)
    moved = [key for key in KEYS if choose(before, key) != choose(after, key)]
    assert all(choose(after, key).name == "a" for key in KEYS)
    assert all(choose(before, key).name == "b" for key in moved)
    assert len(moved) / len(KEYS) == pytest.approx(0.1, abs=SHARE_ABS)


def test_with_three_variants_only_the_dropped_ones_keys_move() -> None:
    # Rendezvous hashing: every key whose winner is still in the race keeps it.
    before = experiment(6, 3, 1)
    after = before.with_weight("c", 0)
    moved = [key for key in KEYS if choose(before, key) != choose(after, key)]
    assert moved and all(choose(before, key).name == "c" for key in moved)
    got = shares([choose(after, key).name for key in KEYS])
    assert got["a"] == pytest.approx(2 / 3, abs=SHARE_ABS)
    assert got["b"] == pytest.approx(1 / 3, abs=SHARE_ABS)


def test_choose_refuses_an_experiment_without_traffic() -> None:
    empty = Experiment("m", (Variant("a", "1", 0.0),), None, None, "0" * 16)
    with pytest.raises(ExperimentError, match="no variant has traffic"):
        choose(empty, "k")


def test_the_shadow_gets_its_share_independently_of_the_variant() -> None:
    split = experiment(90, 10, share=0.2)
    on_a = [key for key in KEYS if choose(split, key).name == "a"]
    on_b = [key for key in KEYS if choose(split, key).name == "b"]
    for keys in (KEYS, on_a, on_b):
        share = sum(mirrored(split, key) for key in keys) / len(keys)
        # b has ~2,000 keys: sqrt(0.2 * 0.8 / 2,000) = 0.9 %, so 3 % there is ~3.4 of those.
        assert share == pytest.approx(0.2, abs=SHARE_ABS if keys is not on_b else 0.03)


def test_no_shadow_mirrors_nothing_and_a_full_share_mirrors_all() -> None:
    assert not any(mirrored(experiment(1, share=None), key) for key in KEYS[:1000])
    assert all(mirrored(experiment(1, share=1.0), key) for key in KEYS[:1000])


def test_routing_key_is_the_key_else_the_request_id() -> None:
    assert routing_key("user-1", "req-9") == "user-1"
    assert routing_key(None, "req-9") == "req-9"
    # An empty key would put every such request in one bucket, and so on one variant.
    assert routing_key("", "req-9") == "req-9"
