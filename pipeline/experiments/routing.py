"""Which variant serves a request, and whether its shadow gets a copy: sticky per routing key.

Every decision is a pure function of the key and the experiment, computed with a keyed hash
that is the same in every process and across restarts (never Python's salted ``hash()``), so
the workers of a group agree, and a key stays with its variant while the weights stay put.
"""

from __future__ import annotations

import hashlib
import math

from pipeline.experiments.config import Experiment, ExperimentError, Variant


def bucket(key: str, salt: str) -> float:
    """A number in [0, 1), uniform over keys, from blake2b of ``salt`` and ``key``.

    The digest is read as a big-endian uint64 over 2**64, truncated to the 53 bits a float
    holds: dividing the whole uint64 rounds the largest ones up to exactly 1.0.
    """
    data = f"{salt}\0{key}".encode("utf-8", "surrogatepass")  # any str, even a lone surrogate
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / 2**53


def choose(experiment: Experiment, key: str) -> Variant:
    """The variant that serves ``key``: weighted rendezvous hashing. Each variant with
    traffic scores the key ``-ln(1 - bucket(key, model:variant)) / weight``, and the lowest
    score wins: an exponential race, which variant i wins with probability
    ``weight_i / sum(weights)``.

    A key keeps its variant while the weights stay the same, and when a variant's weight drops
    to 0 (a canary rolled back) only that variant's keys move, however many variants there
    are: every other key's winner is still in the race.

    Raises:
        ExperimentError: no variant has traffic (`parse` and `Experiment.with_weight` refuse
            to make such an experiment).
    """
    active = experiment.active
    if not active:
        raise ExperimentError("variants", "no variant has traffic", model=experiment.model)
    if len(active) == 1:
        return active[0]
    best, best_score = active[0], math.inf
    for variant in active:
        u = bucket(key, f"{experiment.model}:{variant.name}")
        score = -math.log1p(-u) / variant.weight  # u < 1: finite
        if score < best_score:
            best, best_score = variant, score
    return best


def mirrored(experiment: Experiment, key: str) -> bool:
    """Whether ``key``'s request is copied to the shadow: a share of the keys drawn
    independently of the variant they are served by."""
    shadow = experiment.shadow
    return shadow is not None and bucket(key, experiment.model + ":shadow") < shadow.share


def routing_key(key: str | None, request_id: str) -> str:
    """What a request is routed by: its record key, else its id (a keyless request is routed
    on its own). An empty key counts as none: otherwise every such request would share one
    bucket, and so one variant."""
    return key if key else request_id
