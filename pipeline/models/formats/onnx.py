"""ONNX graphs through onnxruntime.

The execution providers come from the config (``providers``: cpu, cuda, tensorrt, in order
of preference), by default CUDA then CPU on a GPU and the CPU elsewhere; a provider this
onnxruntime build lacks is left out with a warning. On the GPU the batch's device tensors are
bound to the session (IO binding) and the outputs written into device tensors, so a batch
makes no host round trip between the copy in and the copy out.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.models.config import PROVIDERS, ModelConfig, ModelLoadError
from pipeline.models.inputs import torch_dtype

log = logging.getLogger(__name__)

# onnxruntime's element types, as its NodeArg.type strings name them.
ONNX_DATATYPES = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(int16)": "INT16",
    "tensor(int8)": "INT8",
    "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
}


class OnnxModule:
    """Runs an onnxruntime session on a batch's torch tensors, in the config's input order,
    returning its outputs (in the config's output order) as torch tensors."""

    def __init__(self, config: ModelConfig, file: Path, device: torch.device) -> None:
        import onnxruntime as ort

        self.device = device
        available = ort.get_available_providers()
        wanted = [PROVIDERS[p] for p in config.providers] or (
            [PROVIDERS["cuda"], PROVIDERS["cpu"]] if device.type == "cuda" else [PROVIDERS["cpu"]]
        )
        providers = [p for p in wanted if p in available]
        for p in wanted:
            if p not in available:
                log.warning("%s: onnxruntime here has no %s (has %s)", file, p, available)
        if not providers:
            raise ModelLoadError(f"{file}: none of the providers {wanted} is available here")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        threads = os.environ.get("SLUICE_ONNX_THREADS")
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(file), options, providers=providers)
        self.providers = self.session.get_providers()
        graph_inputs = [i.name for i in self.session.get_inputs()]
        names = [s.name for s in config.inputs]
        missing = [n for n in graph_inputs if n not in names]
        if missing:
            raise ModelLoadError(f"{file}: the graph takes inputs {missing} the config lacks")
        # The config may list an input (a mask, say) the graph does not take: it is dropped.
        self._take = [names.index(n) for n in graph_inputs]
        self._input_names = graph_inputs
        graph_outputs = [o.name for o in self.session.get_outputs()]
        wanted_out = [s.name for s in config.outputs]
        absent = [n for n in wanted_out if n not in graph_outputs]
        if not absent:
            self._output_names = wanted_out
        elif len(graph_outputs) == len(wanted_out):  # named otherwise: taken in order
            self._output_names = graph_outputs
        else:
            raise ModelLoadError(f"{file}: the graph has no outputs {absent} ({graph_outputs})")
        self._out_specs = config.outputs
        self._cuda = device.type == "cuda" and self.providers[0] != "CPUExecutionProvider"

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = [tensors[i] for i in self._take]
        if self._cuda:
            return self._run_bound(inputs)
        feeds = {
            n: t.detach().cpu().numpy() for n, t in zip(self._input_names, inputs, strict=True)
        }
        outs = self.session.run(self._output_names, feeds)
        return tuple(torch.from_numpy(np.ascontiguousarray(o)).to(self.device) for o in outs)

    def _run_bound(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """IO binding: inputs read from, and outputs written to, device memory."""
        binding = self.session.io_binding()
        index = self.device.index or 0
        for name, t in zip(self._input_names, inputs, strict=True):
            t = t.contiguous()
            binding.bind_input(name, "cuda", index, _np_type(t.dtype), list(t.shape), t.data_ptr())
        n = inputs[0].shape[0]
        outs: list[torch.Tensor | None] = []
        for name, spec in zip(self._output_names, self._out_specs, strict=True):
            if -1 in spec.shape:  # a shape known only after the run: onnxruntime allocates
                binding.bind_output(name, "cuda", index)
                outs.append(None)
                continue
            out = torch.empty((n, *spec.shape), dtype=torch_dtype(spec.datatype),
                              device=self.device)  # fmt: skip
            binding.bind_output(name, "cuda", index, _np_type(out.dtype), list(out.shape),
                                out.data_ptr())  # fmt: skip
            outs.append(out)
        # onnxruntime runs on its own stream: the inputs must be ready before it starts.
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        if any(o is None for o in outs):
            values = binding.get_outputs()
            outs = [
                o if o is not None else torch.from_numpy(values[i].numpy()).to(self.device)
                for i, o in enumerate(outs)
            ]
        return tuple(o for o in outs if o is not None)

    def to(self, *_args: Any, **_kwargs: Any) -> OnnxModule:
        return self


def _np_type(dtype: torch.dtype) -> Any:
    return torch.empty(0, dtype=dtype).numpy().dtype.type


def load(config: ModelConfig, path: Path, device: torch.device) -> OnnxModule:
    return OnnxModule(config, path / "model.onnx", device)


def describe(
    file: Path,
) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """A graph's inputs and outputs as (name, datatype, per-example shape): the leading
    (batch) dimension dropped, other symbolic dimensions -1."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])

    def specs(args: Any) -> list[tuple[str, str, list[int]]]:
        out = []
        for a in args:
            if a.type not in ONNX_DATATYPES:
                raise ModelLoadError(f"{file}: {a.name} has type {a.type}, not supported")
            dims = [d if isinstance(d, int) and d > 0 else -1 for d in a.shape]
            out.append((a.name, ONNX_DATATYPES[a.type], dims[1:]))
        return out

    return specs(session.get_inputs()), specs(session.get_outputs())
