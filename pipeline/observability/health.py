"""What the worker's probes report (``/readyz``, ``/healthz``), from the engine's own state.

- Ready: every model loaded and warmed up, the consumer has joined its group and received
  an assignment, and the worker is not stopping. A member with more replicas than partitions
  may be assigned none; it is still ready (it takes partitions over when a member leaves).
- Live: the engine's loop has started and went round within ``stall_s``. A loop that stops
  going round (a deadlock, a call that never returns) fails liveness, and Kubernetes
  restarts the pod; one that is only slow does not. A worker that is stopping stays live
  while it drains: its shutdown is bounded by its own watchdog (`pipeline.engines.worker`).

The engine writes (`beat`, `assigned`, ...) from its loop; the HTTP server's threads read.
Each field is one reference, written whole, so the readers need no lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class Health:
    """The worker's readiness and liveness, as the engine last reported them."""

    def __init__(self, stall_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.stall_s = stall_s
        self.clock = clock
        self.models_ready = False
        self.partitions: int | None = None  # None until the first assignment
        self.stopping = False
        self._beat: float | None = None  # None until the loop starts

    def beat(self) -> None:
        """The loop went round (called once per turn: one clock read and one store)."""
        self._beat = self.clock()

    def assigned(self, partitions: int) -> None:
        self.partitions = partitions

    def revoked(self) -> None:
        """A rebalance took the partitions (faust also calls this before the first one)."""
        if self.partitions is not None:
            self.partitions = 0

    def stop(self) -> None:
        self.stopping = True

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Whether to send this worker work, and why not."""
        reasons = []
        if not self.models_ready:
            reasons.append("models loading")
        if self.partitions is None:
            reasons.append("no assignment yet")
        if self.stopping:
            reasons.append("stopping")
        return not reasons, {
            "ready": not reasons,
            "reasons": reasons,
            "models_ready": self.models_ready,
            "partitions": self.partitions,
        }

    def live(self) -> tuple[bool, dict[str, Any]]:
        """Whether the loop is still going round (within ``stall_s``)."""
        if self._beat is None:
            return False, {"live": False, "reason": "starting"}
        idle_s = self.clock() - self._beat
        ok = idle_s <= self.stall_s
        body: dict[str, Any] = {"live": ok, "loop_idle_s": round(idle_s, 3)}
        if not ok:
            body["reason"] = f"the loop has not gone round for {idle_s:.0f} s"
        return ok, body
