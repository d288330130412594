"""`benchmarks/gcprobe`: a worker process writes its collector passes as it exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = Path(__file__).resolve().parents[3] / "benchmarks" / "gcprobe"


def run(tmp_path: Path, argv: list[str]) -> Path:
    out = tmp_path / "gc.jsonl"
    env = {**os.environ, "PYTHONPATH": str(PROBE), "SLUICE_GC_PROBE": str(out)}
    code = "import gc, sys; gc.set_threshold(123, 4, 5); gc.collect(); gc.collect(1)"
    subprocess.run([sys.executable, "-c", code, *argv], env=env, check=True, timeout=60)
    return out


def test_a_worker_writes_its_passes_and_thresholds(tmp_path: Path) -> None:
    out = run(tmp_path, ["worker"])
    [line] = out.read_text().splitlines()
    record = json.loads(line)
    assert record["passes"][2] >= 1 and record["passes"][1] >= 1
    assert all(s >= 0 for s in record["seconds"])
    assert record["thresholds"] == [123, 4, 5]


def test_another_process_writes_nothing(tmp_path: Path) -> None:
    assert not run(tmp_path, ["client"]).exists()
