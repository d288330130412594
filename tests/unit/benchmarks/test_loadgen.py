from __future__ import annotations

import pytest

from benchmarks import loadgen
from benchmarks.bench import counts_up_to


def test_scaling_points_are_powers_of_two_and_the_most() -> None:
    assert counts_up_to(1) == [1]
    assert counts_up_to(2) == [1, 2]
    assert counts_up_to(6) == [1, 2, 4, 6]
    assert counts_up_to(8) == [1, 2, 4, 8]


@pytest.mark.parametrize(
    ("workers", "cores", "count"),
    [
        (1, 2, 1),  # this 2-core machine: always one
        (8, 2, 1),
        (1, 16, 1),
        (2, 16, 1),
        (4, 16, 2),
        (8, 16, 4),
        (16, 16, 4),  # at most one per four cores
        (3, 64, 2),
    ],
)
def test_one_generator_per_two_workers_within_the_cores(
    workers: int, cores: int, count: int
) -> None:
    assert loadgen.auto_count(workers, cores) == count
