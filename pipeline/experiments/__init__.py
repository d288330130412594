"""Live-traffic experiments (A/B/n splits, canaries, shadows, the rollback guard): the pure
core, with no Kafka in it.

- `config`: what an ``experiment.json`` may say, and the experiments in force, reloaded;
- `routing`: which variant serves a request, and whether its shadow gets a copy;
- `guard`: when a canary is rolled back.
"""

from __future__ import annotations

from pipeline.experiments.config import (
    Experiment,
    ExperimentError,
    Experiments,
    Guard,
    Shadow,
    Variant,
    load,
    parse,
)
from pipeline.experiments.guard import Rollback, RollbackGuard
from pipeline.experiments.routing import bucket, choose, mirrored, routing_key

__all__ = [
    "Experiment",
    "ExperimentError",
    "Experiments",
    "Guard",
    "Rollback",
    "RollbackGuard",
    "Shadow",
    "Variant",
    "bucket",
    "choose",
    "load",
    "mirrored",
    "parse",
    "routing_key",
]
