"""A worker whose loop stops going round ends itself (status 75) with its stack on stderr,
when ``exit_on_stall`` asks for it; a stopping or still-starting worker does not."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pipeline.engines.worker import EXIT_STUCK

SCRIPT = textwrap.dedent(
    """
    import time
    from pipeline.engines.worker import exit_if_stalled
    from pipeline.observability.health import Health

    health = Health(stall_s=0.3)
    {setup}
    exit_if_stalled(health, check_s=0.05)
    time.sleep(3)  # the loop "hangs" here
    """
)


def _run(setup: str) -> subprocess.CompletedProcess[str]:
    code = SCRIPT.format(setup=setup)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_a_stalled_loop_ends_the_process_with_its_stack() -> None:
    done = _run("health.beat()")
    assert done.returncode == EXIT_STUCK
    assert "has not gone round" in done.stderr
    assert "time.sleep(3)" in done.stderr or "<string>" in done.stderr  # the main thread


@pytest.mark.parametrize("setup", ["pass", "health.beat(); health.stop()"])
def test_a_starting_or_stopping_worker_is_left_alone(setup: str) -> None:
    assert _run(setup).returncode == 0
