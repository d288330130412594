"""How a loaded model's batches reach the device and come back.

- `TensorPool`: reused host buffers keyed by shape and dtype, pinned where CUDA is present
  (a pinned buffer makes a host-to-device copy asynchronous), bounded in bytes.
- `DeviceStreams`: a copy stream beside the compute stream, so that batch N+1's inputs
  travel while batch N computes.
- `Pending`: a submitted batch; `result()` waits for it and returns numpy outputs.
- `GraphRunner`: one CUDA graph per bucket shape, so that a batch is one launch.
- `apply_precision`: FP16/BF16 on CUDA, INT8 dynamic quantisation on CPU, per model.
- `memory_bytes`: what a model holds, for its memory budget.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


class Precision(StrEnum):
    """The dtype a model computes in: fp16/bf16 on CUDA, int8 (dynamic quantisation of
    Linear layers) on CPU."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"


PRECISIONS = tuple(p.value for p in Precision)
_FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_POOL_BYTES = 256 * 1024 * 1024


class TensorPool:
    """Host buffers reused across batches, at most ``max_bytes`` of them idle.

    ``take`` hands out an idle buffer of exactly that shape and dtype (a reuse) or allocates
    one; ``give`` returns it. When the idle buffers exceed ``max_bytes`` the least recently
    returned are dropped. Buffers are pinned (page-locked) when ``pin`` is true.
    """

    def __init__(self, max_bytes: int = DEFAULT_POOL_BYTES, pin: bool = False) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.pin = pin
        self._idle: OrderedDict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()
        self.idle_bytes = 0
        self.reuses = 0
        self.allocations = 0
        self.evictions = 0

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        key = (tuple(int(d) for d in shape), dtype)
        with self._lock:
            free = self._idle.get(key)
            if free:
                tensor = free.pop()
                if not free:
                    del self._idle[key]
                self.idle_bytes -= _nbytes(tensor)
                self.reuses += 1
                return tensor
            self.allocations += 1
        return torch.empty(key[0], dtype=dtype, pin_memory=self.pin)

    def give(self, tensor: torch.Tensor) -> None:
        size = _nbytes(tensor)
        if size > self.max_bytes:
            return
        key = (tuple(tensor.shape), tensor.dtype)
        with self._lock:
            self._idle.setdefault(key, []).append(tensor)
            self._idle.move_to_end(key)
            self.idle_bytes += size
            while self.idle_bytes > self.max_bytes:
                oldest_key, oldest = next(iter(self._idle.items()))
                dropped = oldest.pop(0)
                if not oldest:
                    del self._idle[oldest_key]
                self.idle_bytes -= _nbytes(dropped)
                self.evictions += 1


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class DeviceStreams:
    """One copy stream and one compute stream per CUDA device; None on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.copy: Any = None
        self.compute: Any = None
        if device.type == "cuda":
            self.copy = torch.cuda.Stream(device)
            self.compute = torch.cuda.Stream(device)


class GraphRunner:
    """Runs a module through CUDA graphs, one per input shape and dtype.

    Launching a model's kernels one by one costs the CPU tens of microseconds each (ResNet-50:
    ~160 launches, a third of a worker's time at 7k images/s); a graph replays them all in
    one launch. A shape's graph is captured the first time it is seen (warm-up runs every
    bucket shape); a module that cannot be captured (it synchronises, say) runs eagerly for
    that shape from then on, with a warning. Inputs are copied into the graph's static
    inputs and the outputs returned are the graph's static outputs, valid until the next
    replay: callers copy them out on the same stream before another batch is started.
    """

    def __init__(self, module: Callable[..., Any], label: str) -> None:
        self.module = module
        self.label = label
        self._graphs: dict[tuple[Any, ...], tuple[Any, list[torch.Tensor], Any]] = {}
        self._eager: set[tuple[Any, ...]] = set()
        self._pool: Any = None  # one memory pool for all of this model's graphs

    def __call__(self, inputs: list[torch.Tensor]) -> Any:
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        entry = self._graphs.get(key)
        if entry is None and key not in self._eager:
            entry = self._capture(key, inputs)
        if entry is None:
            return self.module(*inputs)
        graph, static_inputs, static_outputs = entry
        for static, t in zip(static_inputs, inputs, strict=True):
            static.copy_(t, non_blocking=True)
        graph.replay()
        return static_outputs

    def _capture(
        self, key: tuple[Any, ...], inputs: list[torch.Tensor]
    ) -> tuple[Any, list[torch.Tensor], Any] | None:
        static_inputs = [t.clone() for t in inputs]
        stream = torch.cuda.current_stream()
        side = torch.cuda.Stream(stream.device)
        side.wait_stream(stream)
        try:
            with torch.cuda.stream(side):
                for _ in range(2):  # cuBLAS/cuDNN pick their kernels before capture
                    self.module(*static_inputs)
            stream.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                static_outputs = self.module(*static_inputs)
        except RuntimeError as exc:
            log.warning("%s: no CUDA graph for inputs %s (%s); running eagerly",
                        self.label, [list(s) for s, _ in key], exc)  # fmt: skip
            self._eager.add(key)
            return None
        entry = (graph, static_inputs, static_outputs)
        self._graphs[key] = entry
        return entry


class Pending:
    """A batch on its way through the device; `result` waits and returns its outputs.

    Inputs' host buffers go back to the pool once the batch is done; outputs come back as
    numpy arrays of the batch's real rows (padding rows removed).
    """

    def __init__(
        self,
        outputs: list[torch.Tensor],
        n: int,
        release: Callable[[], None],
        pool: TensorPool | None = None,
        start: Any = None,
        done: Any = None,
        elapsed_s: float = 0.0,
        extras: dict[str, np.ndarray] | None = None,
    ) -> None:
        self._outputs = outputs
        # Per-row notes from preparing the batch (``truncated``, say), for the answers.
        self.extras = extras or {}
        self.n = n
        self._release = release
        self._pool = pool  # set when ``outputs`` are pooled host buffers
        self._start = start
        self._done = done
        self.elapsed_s = elapsed_s
        self._result: list[np.ndarray] | None = None

    @classmethod
    def done(cls, arrays: list[np.ndarray], n: int, elapsed_s: float) -> Pending:
        """A batch already computed (a handler's), its outputs numpy arrays."""
        pending = cls([], n, lambda: None, elapsed_s=elapsed_s)
        pending._result = arrays
        return pending

    def ready(self) -> bool:
        """True once ``result`` will not block."""
        return self._done is None or bool(self._done.query())

    def result(self) -> list[np.ndarray]:
        if self._result is not None:
            return self._result
        try:
            if self._done is not None:
                self._done.synchronize()
                self.elapsed_s = self._start.elapsed_time(self._done) / 1000.0
            # Pooled buffers are reused by later batches: the caller gets its own copy.
            n = self.n
            self._result = [
                o[:n].numpy().copy() if self._pool else o[:n].numpy() for o in self._outputs
            ]
        finally:
            self._release()
            if self._pool is not None:
                for o in self._outputs:
                    self._pool.give(o)
                self._pool = None
        return self._result


def apply_precision(
    module: nn.Module, precision: str, device: torch.device, label: str
) -> tuple[nn.Module, torch.dtype | None]:
    """The module in the precision its config asks for, and the dtype for float inputs.

    FP16/BF16 apply on CUDA and INT8 (dynamic quantisation of Linear layers) on CPU; asked
    for elsewhere, a warning is logged and the float model runs.
    """
    if precision in _FLOAT_DTYPES:
        if device.type != "cuda":
            log.warning("%s: precision %s needs CUDA; running fp32 on %s", label, precision,
                        device)  # fmt: skip
            return module, None
        dtype = _FLOAT_DTYPES[precision]
        return module.to(dtype), dtype
    if precision == "int8":
        if device.type != "cpu":
            log.warning("%s: precision int8 is CPU-only here; running the float model on %s",
                        label, device)  # fmt: skip
            return module, None
        if isinstance(module, torch.jit.ScriptModule):
            log.warning("%s: int8 does not apply to TorchScript; running fp32", label)
            return module, None
        with warnings.catch_warnings():
            # torch.ao.quantization and quantized tensors are deprecated (Deprecation- and
            # UserWarnings) in favour of torchao, not installed here; dynamic quantisation
            # still works and is what this option means. Running the model warns nothing.
            warnings.simplefilter("ignore")
            quantized = torch.ao.quantization.quantize_dynamic(
                module, {nn.Linear}, dtype=torch.qint8
            )
        return quantized, None
    return module, None


def memory_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (packed quantised weights included)."""
    total = sum(t.numel() * t.element_size() for t in module.parameters())
    total += sum(t.numel() * t.element_size() for t in module.buffers())
    for sub in module.modules():
        packed = getattr(sub, "_packed_params", None)
        weight = getattr(packed, "_weight_bias", None)
        if callable(weight):
            total += sum(
                (t.numel() * t.element_size()) for t in weight() if isinstance(t, torch.Tensor)
            )
    return total


class CudaMemoryMeter:
    """Peak CUDA memory allocated between `__enter__` and `__exit__`, in bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self._base = 0

    def __enter__(self) -> CudaMemoryMeter:
        torch.cuda.synchronize(self.device)
        self._base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *_exc: object) -> None:
        torch.cuda.synchronize(self.device)
        self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
