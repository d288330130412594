"""A model loaded onto its device: batches (stacked by `pipeline.models.inputs`) submitted
to the device, on its streams, and split back per request; warm-up over every bucket shape."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.batching.scheduler import (
    BatchPolicy,
    default_buckets,
)
from pipeline.models.config import ModelConfig
from pipeline.models.formats import load_module
from pipeline.models.formats.handler import run as run_handler
from pipeline.models.inputs import HostBatch, Inputs, torch_dtype
from pipeline.models.runtime import (
    DeviceStreams,
    GraphRunner,
    Pending,
    TensorPool,
    apply_precision,
)
from pipeline.protocol.codec import Tensor

log = logging.getLogger(__name__)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LoadedModel:
    """One model version, ready to run on batches of numpy inputs.

    Args:
        pool: host buffers shared by the registry's models (own one by default).
        streams: the device's copy and compute streams (own ones by default).
        max_batch_size: the default when the config sets none.
    """

    def __init__(
        self,
        name: str,
        version: str,
        path: Path,
        device: torch.device,
        *,
        pool: TensorPool | None = None,
        streams: DeviceStreams | None = None,
        max_batch_size: int = 64,
    ) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.device = device
        self.config = cfg = ModelConfig.read(path / "config.json")
        self.max_batch_size = cfg.max_batch_size or max_batch_size
        if cfg.batch_buckets and not cfg.max_batch_size:  # the model's buckets bound it
            self.max_batch_size = min(self.max_batch_size, cfg.batch_buckets[-1])
        self.batch_buckets = cfg.batch_buckets or default_buckets(self.max_batch_size)
        self.seq_buckets = cfg.seq_buckets
        # A handler's outputs (BYTES among them) are its own arrays, never torch tensors.
        handler = cfg.format == "handler"
        self._out_dtypes = [] if handler else [torch_dtype(s.datatype) for s in cfg.outputs]
        label = f"model {name}:{version}"
        self.pool = pool or TensorPool(pin=device.type == "cuda")
        # The preparer (a tokenizer, say) first: a config it cannot serve fails before the
        # weights are read.
        self.inputs = Inputs(f"{name}:{version}", cfg, self.batch_buckets, self.seq_buckets,
                             self.pool, path, device)  # fmt: skip
        module = load_module(cfg, path, device)
        self.input_dtype: torch.dtype | None = None
        self.graphs: GraphRunner | None = None
        if isinstance(module, nn.Module):
            self.module, self.input_dtype = apply_precision(module, cfg.precision, device, label)
            if cfg.image is not None and cfg.image.channels_last:
                self.module = self.module.to(memory_format=torch.channels_last)
            if cfg.compile:
                self.module = _compile(self.module, self.shapes(), cfg.compile, cfg.cuda_graphs)
            # One CUDA graph per bucket shape, captured at warm-up: a batch is one launch.
            if cfg.cuda_graphs:
                if device.type == "cuda":
                    self.graphs = GraphRunner(self.module, label)
                else:
                    log.warning("%s: cuda_graphs needs CUDA; running eagerly on %s", label,
                                device)  # fmt: skip
        else:  # ONNX Runtime, a handler: their own runtimes
            self.module = module
            for option in ("compile", "cuda_graphs"):
                if getattr(cfg, option):
                    log.warning("%s: %s applies to torch modules; %s ignores it", label, option,
                                cfg.format)  # fmt: skip
            if cfg.precision != "fp32":
                log.warning("%s: precision %s applies to torch modules; export the %s model in "
                            "the precision wanted", label, cfg.precision, cfg.format)  # fmt: skip
        self.client_inputs = self.inputs.client_inputs
        preparer = self.inputs.preparer
        if getattr(preparer, "on_device", False) and self.input_dtype is not None:
            preparer.out_dtype = self.input_dtype  # normalised straight into fp16/bf16
        self.streams = streams or DeviceStreams(device)
        # Measured at warm-up, seconds per batch bucket (at the longest sequence bucket).
        self.batch_time_s: dict[int, float] = {}
        self.memory_bytes = 0

    def shapes(self) -> list[tuple[int, int | None]]:
        """Every (batch bucket, sequence bucket) shape a batch of this model can have."""
        seqs: Sequence[int | None] = self.seq_buckets if self.inputs.variable else (None,)
        return [(b, s) for b in self.batch_buckets for s in seqs]

    def policy(
        self, max_delay_s: float, default_ttl_s: float | None = None, adaptive: bool = False
    ) -> BatchPolicy:
        """How the batcher flushes this model: its config's values over the settings'."""
        cfg = self.config
        delay = cfg.max_delay_ms / 1000.0 if cfg.max_delay_ms is not None else max_delay_s
        budget = cfg.time_budget_ms / 1000.0 if cfg.time_budget_ms is not None else None
        return BatchPolicy(
            self.max_batch_size, delay, self.batch_buckets, budget, default_ttl_s, adaptive
        )

    def inputs_from_request(
        self, tensors: list[Tensor], max_elements: int, flat: bool = False
    ) -> list[Any]:
        """Check a request's tensors against this model's inputs (`Inputs.from_request`)."""
        return self.inputs.from_request(tensors, max_elements, flat)

    def stack_inputs(self, rows: Sequence[Sequence[Any]]) -> HostBatch:
        """A batch in pooled host buffers, padded to its buckets (`Inputs.stack`)."""
        return self.inputs.stack(rows)

    def submit(self, batch: HostBatch) -> Pending:
        """Start a batch; `Pending.result` returns one numpy array per output (real rows).

        The batch's buffers go back to the pool once the result is in; if this raises, the
        caller still owns them (to retry, or to `HostBatch.release`).

        On CUDA the inputs go host to device on the copy stream (non-blocking, from pinned
        buffers), the compute stream waits for them, and the outputs come back in one
        device-to-host copy into pooled buffers: the caller can prepare the next batch
        meanwhile. On CPU the same steps run at once.
        """
        n = batch.n
        if batch.requests is not None:  # a handler: its own pre-, post-processing and device
            t0 = time.perf_counter()
            with torch.inference_mode():
                arrays = run_handler(self.module, batch.requests)  # type: ignore[arg-type]
            return Pending.done(arrays, n, time.perf_counter() - t0)
        with torch.inference_mode():
            if self.streams.compute is not None:
                return self._submit_cuda(batch)
            t0 = time.perf_counter()
            outs = self._outputs(self.module(*batch.tensors), n)
            elapsed = time.perf_counter() - t0
        inputs = {t.untyped_storage().data_ptr() for t in batch.tensors}
        # A model may hand back (a view of) its input, whose buffer is reused: copy that.
        outs = [o.clone() if o.untyped_storage().data_ptr() in inputs else o for o in outs]
        return Pending(outs, n, batch.release, elapsed_s=elapsed, extras=batch.extras)

    def _submit_cuda(self, batch: HostBatch) -> Pending:
        copy, compute = self.streams.copy, self.streams.compute
        if any(t.is_cuda for t in batch.tensors):
            # Prepared on the device (images decoded there) on this thread's stream.
            copy.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(copy):
            dev = [t.to(self.device, non_blocking=True) for t in batch.tensors]
            copied = torch.cuda.Event()
            copied.record(copy)
        compute.wait_event(copied)
        with torch.cuda.stream(compute):
            start = torch.cuda.Event(enable_timing=True)
            start.record(compute)
            for d in dev:
                d.record_stream(compute)  # allocated on the copy stream, used here
            if self.input_dtype is not None:
                dev = [d.to(self.input_dtype) if d.is_floating_point() else d for d in dev]
            out = self.graphs(dev) if self.graphs is not None else self.module(*dev)
            outs = self._outputs(out, batch.n)
            # Host buffers of the bucket's shape, not the batch's: a pinned allocation for
            # every new row count would synchronise the device each time.
            bucket = batch.tensors[0].shape[0] if batch.tensors else batch.n
            host = []
            for o in outs:
                h = self.pool.take((bucket, *o.shape[1:]), o.dtype)
                h[: batch.n].copy_(o, non_blocking=True)
                host.append(h)
            # Blocking: the thread that waits for it sleeps instead of spinning a core.
            done = torch.cuda.Event(enable_timing=True, blocking=True)
            done.record(compute)
        return Pending(host, batch.n, batch.release, self.pool, start, done, extras=batch.extras)

    def _outputs(self, out: Any, n: int) -> list[torch.Tensor]:
        """The real rows of each output, in the datatype its config names."""
        outs = out if isinstance(out, (tuple, list)) else (out,)
        result = []
        for i, o in enumerate(outs):
            o = o[:n]
            if i < len(self._out_dtypes) and o.dtype != self._out_dtypes[i]:
                o = o.to(self._out_dtypes[i])
            result.append(o.contiguous())
        return result

    def run(self, batch: HostBatch | Sequence[Any]) -> list[np.ndarray]:
        """Run one batch; return one array per output.

        ``batch`` is a `HostBatch`, or one stacked array per client input (any number of
        rows: run in chunks of the largest batch bucket).
        """
        if isinstance(batch, HostBatch):
            return self.submit(batch).result()
        arrays = [a if isinstance(a, list) else np.asarray(a) for a in batch]
        n = len(arrays[0]) if arrays else 0
        step = min(self.max_batch_size, self.batch_buckets[-1])
        parts = []
        for lo in range(0, n, step):
            rows = [[a[i] for a in arrays] for i in range(lo, min(n, lo + step))]
            parts.append(self.submit(self.stack_inputs(rows)).result())
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate(p) for p in zip(*parts, strict=True)]

    def warm_up(self) -> None:
        """Run every (batch bucket x sequence bucket) shape once, and time it once more.

        An eager model on the CPU captures and compiles nothing per shape: there the shortest
        sequence bucket stands for the others (MiniLM on 2 cores: 7 s instead of 38 s), and
        the batcher learns the longer ones' times from real batches. A handler warms itself
        up in its ``load``."""
        if self.inputs.handler:
            return
        shapes = self.shapes()
        if self.device.type == "cpu" and not self.config.compile and self.inputs.variable:
            shapes = [(b, s) for b, s in shapes if s == self.seq_buckets[0]]
        for bucket, seq_len in shapes:
            rows = [self.inputs.example(seq_len)] * bucket
            self.submit(self.stack_inputs(rows)).result()
            pending = self.submit(self.stack_inputs(rows))
            pending.result()
            known = self.batch_time_s.get(bucket, 0.0)
            self.batch_time_s[bucket] = max(known, pending.elapsed_s)


def _compile(
    module: nn.Module, shapes: list[tuple[int, int | None]], mode: bool | str, graphs: bool
) -> nn.Module:
    """torch.compile with one static graph per bucket shape (warm-up compiles them all).

    ``mode`` is true (the default mode) or a torch.compile mode. With ``cuda_graphs`` the
    runtime's own `GraphRunner` captures the compiled kernels, one graph per bucket shape on
    any thread; a mode that would capture them itself (reduce-overhead, max-autotune)
    compiles without its own graphs then."""
    import torch._dynamo.config as dynamo_config

    name = "default" if mode is True else str(mode)
    if graphs and name in ("reduce-overhead", "max-autotune"):
        name = "default" if name == "reduce-overhead" else "max-autotune-no-cudagraphs"

    # Past the recompile limit dynamo silently runs eager: allow one graph per shape.
    for limit in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        current = getattr(dynamo_config, limit, None)
        if isinstance(current, int) and current < len(shapes) + 8:
            setattr(dynamo_config, limit, len(shapes) + 8)
    return torch.compile(module, dynamic=False, mode=name)  # type: ignore[return-value]
