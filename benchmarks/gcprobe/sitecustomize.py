"""The garbage collector's passes in a worker process, for `sluice bench`.

Put this folder first on ``PYTHONPATH`` and name a file in ``SLUICE_GC_PROBE``: each
``sluice worker`` process the run starts then writes, as it exits, a JSON line to that file
with its passes per generation and their seconds (`gc.callbacks`), from start to exit::

    PYTHONPATH=benchmarks/gcprobe:. SLUICE_GC_PROBE=/tmp/gc.jsonl \\
        sluice bench --mode fused --requests 150000 --json

Passes that do not grow with ``--requests`` are the worker's start; the rest are its run.
Nothing happens in a process without ``SLUICE_GC_PROBE`` or that is not a worker.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("SLUICE_GC_PROBE") and "worker" in sys.argv:
    import atexit
    import gc
    import json
    import time

    _passes = [0, 0, 0]
    _seconds = [0.0, 0.0, 0.0]
    _started = [0.0]

    def _count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            _started[0] = time.perf_counter()
            return
        generation = info["generation"]
        _passes[generation] += 1
        _seconds[generation] += time.perf_counter() - _started[0]

    def _write() -> None:
        line = {"pid": os.getpid(), "passes": _passes, "seconds": [round(s, 4) for s in _seconds],
                "thresholds": list(gc.get_threshold())}  # fmt: skip
        with open(os.environ["SLUICE_GC_PROBE"], "a") as out:
            out.write(json.dumps(line) + "\n")

    gc.callbacks.append(_count)
    atexit.register(_write)
