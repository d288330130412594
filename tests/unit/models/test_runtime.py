"""The model runtime on CPU: pooled buffers, submit/result, buckets and masks, warm-up, lazy
loading, memory budgets, precision (INT8 quantisation; FP16 falling back), config checks."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from pipeline.config import Settings
from pipeline.models import (
    ARCHITECTURES,
    MLP,
    LoadedModel,
    ModelConfig,
    ModelLoadError,
    ModelRegistry,
    TensorSpec,
    demo_config,
    save_model,
)
from pipeline.models.runtime import TensorPool
from pipeline.observability.metrics import Metrics
from pipeline.protocol import codec
from pipeline.protocol.codec import BAD_SHAPE, RequestError, Tensor
from pipeline.serving import Job, Origin, Pipeline

CPU = torch.device("cpu")


class MaskedMean(nn.Module):
    """Embeds token ids, averages them over the attention mask, classifies the average."""

    seen: list[tuple[int, ...]] = []  # the id shapes every call saw

    def __init__(self, vocab: int, dim: int, out: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, out)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        MaskedMean.seen.append(tuple(ids.shape))
        m = mask.to(torch.float32).unsqueeze(-1)
        summed = (self.emb(ids) * m).sum(1)
        return self.head(summed / m.sum(1).clamp(min=1.0))


@pytest.fixture
def masked_arch(monkeypatch: pytest.MonkeyPatch) -> type[MaskedMean]:
    monkeypatch.setitem(ARCHITECTURES, "masked_mean", MaskedMean)
    MaskedMean.seen = []
    return MaskedMean


def seq_config(**options: Any) -> ModelConfig:
    return ModelConfig(
        format="safetensors",
        inputs=(TensorSpec("ids", "INT64", (-1,)), TensorSpec("mask", "INT64", (-1,))),
        outputs=(TensorSpec("logits", "FP32", (3,)),),
        arch="masked_mean",
        arch_config={"vocab": 50, "dim": 8, "out": 3},
        mask_input="mask",
        seq_buckets=(4, 8),
        batch_buckets=(1, 4),
        **options,
    )


def save_seq(model_dir: Path, name: str = "seq", **options: Any) -> MaskedMean:
    torch.manual_seed(3)
    module = MaskedMean(50, 8, 3).eval()
    save_model(model_dir, name, "1", module, seq_config(**options))
    return module


def save_mlp(model_dir: Path, name: str, **options: Any) -> MLP:
    torch.manual_seed(11)
    cfg = demo_config()
    module = MLP(16, [64], 4).eval()
    config = ModelConfig(
        format="safetensors",
        inputs=cfg.inputs,
        outputs=cfg.outputs,
        arch="mlp",
        arch_config={"in_features": 16, "hidden": [64], "out_features": 4},
        **options,
    )
    save_model(model_dir, name, "1", module, config)
    return module


def features(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)


# -- the tensor pool ------------------------------------------------------------------------


def test_pool_reuses_buffers_by_shape_and_dtype() -> None:
    pool = TensorPool(max_bytes=1 << 20)
    a = pool.take((4, 16), torch.float32)
    pool.give(a)
    b = pool.take((4, 16), torch.float32)
    assert b is a and pool.reuses == 1 and pool.allocations == 1
    c = pool.take((4, 16), torch.int64)  # another dtype: a new buffer
    d = pool.take((8, 16), torch.float32)  # another shape: a new buffer
    assert c is not a and d is not a and pool.allocations == 3
    assert not a.is_pinned()  # no CUDA here: plain host memory


def test_pool_is_bounded_in_bytes_and_evicts_the_oldest() -> None:
    pool = TensorPool(max_bytes=1000)
    first = pool.take((100,), torch.float32)  # 400 bytes
    second = pool.take((100,), torch.int32)  # 400 bytes
    third = pool.take((50,), torch.float64)  # 400 bytes
    for t in (first, second, third):
        pool.give(t)
    assert pool.idle_bytes == 800 and pool.evictions == 1
    assert pool.take((100,), torch.float32) is not first  # the oldest went
    assert pool.take((50,), torch.float64) is third
    pool.give(pool.take((1000,), torch.float32))  # larger than the bound: never kept
    assert pool.idle_bytes <= 1000
    with pytest.raises(ValueError, match="max_bytes must be an integer >= 0, got -1"):
        TensorPool(max_bytes=-1)


# -- submit / result, buckets ---------------------------------------------------------------


def test_submit_result_equals_run_and_the_module(registry: ModelRegistry) -> None:
    model = registry.resolve("demo", "1")
    x = features(3)
    [expected] = model.run([x])
    batch = model.stack_inputs([[row] for row in x])
    assert batch.tensors[0].shape == (4, 16)  # padded to the batch bucket
    first = model.submit(batch)
    second = model.submit(model.stack_inputs([[row] for row in features(5, seed=1)]))
    [out] = first.result()  # two in flight at once, each its own outputs
    [out2] = second.result()
    assert out.shape == (3, 4) and out2.shape == (5, 4)
    # Submitted and run share the bucket, but not the kernels' choice of blocking for two
    # batches in flight: float sums may round differently (bit-equality held by chance).
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    with torch.inference_mode():
        np.testing.assert_allclose(
            out, model.module(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-6
        )
    reused = registry.pool.reuses
    for _ in range(3):
        model.run([x])
    assert registry.pool.reuses >= reused + 3  # the same buffers, again and again


def test_run_takes_more_rows_than_the_largest_bucket(tmp_path: Path) -> None:
    module = save_mlp(tmp_path, "m", batch_buckets=[2, 4], max_batch_size=4)
    model = ModelRegistry(tmp_path, device=CPU).resolve("m")
    x = features(11)
    [out] = model.run([x])
    with torch.inference_mode():
        np.testing.assert_allclose(out, module(torch.from_numpy(x)).numpy(), atol=1e-6)


def test_raw_bytes_stack_without_per_request_arrays(registry: ModelRegistry) -> None:
    model = registry.resolve("demo", "1")
    x = features(2)
    tensors = [[Tensor("features", "FP32", [16], row.astype("<f4").tobytes())] for row in x]
    rows = [model.inputs_from_request(t, 1000, flat=True) for t in tensors]
    assert all(type(r[0]) is bytes for r in rows)  # kept raw until the batch is stacked
    [out] = model.submit(model.stack_inputs(rows)).result()
    # The same values stacked from bytes and from arrays; the tolerance covers the CPU's
    # kernels, which need not round two calls alike.
    np.testing.assert_allclose(out, model.run([x])[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(RequestError) as info:
        model.inputs_from_request([Tensor("features", "FP32", [16], b"\0" * 60)], 1000, True)
    assert info.value.code == BAD_SHAPE and "needs 64 bytes" in info.value.message


def test_flat_lists_stack_to_numpys_own_conversion(registry: ModelRegistry) -> None:
    """A batch of requests' flat lists stacks to the values numpy gives each row converted
    on its own (floats, ints, bools, near the datatype's limits); a value beyond FP32's
    range fails the batch, which is then bisected to the request."""
    model = registry.resolve("demo", "1")
    rows = features(5, seed=3).astype(np.float64).tolist()
    rows[1][:4] = [3, True, 2**60 + 12345, -16777217]  # ints and a bool are numbers too
    rows[2][:3] = [3.4028234e38, -1e-40, 1e-320]  # FP32's largest; below its normal range
    kept = [model.inputs_from_request([Tensor("features", "FP32", [16], r)], 1000, flat=True)
            for r in rows]  # fmt: skip
    assert all(k[0] is r for k, r in zip(kept, rows, strict=True))  # lists until stacked
    batch = model.stack_inputs(kept)
    try:
        # Each number reaches FP32 through a double on both paths, so the values agree; a
        # tolerance all the same, as for any floats reached two ways.
        np.testing.assert_allclose(
            batch.arrays[0], np.array(rows, dtype=np.float32), rtol=1e-6, atol=1e-45
        )
    finally:
        batch.release()
    rows[4][0] = 1e39  # a double, beyond FP32
    with pytest.raises(ValueError, match="out of range"):
        model.stack_inputs([[r] for r in rows])


# -- sequences: padding, masks, warm-up -----------------------------------------------------


def test_variable_length_inputs_are_padded_with_a_mask(
    tmp_path: Path, masked_arch: type[MaskedMean]
) -> None:
    module = save_seq(tmp_path)
    model = ModelRegistry(tmp_path, device=CPU).resolve("seq")
    assert [s.name for s in model.client_inputs] == ["ids"]  # the mask is made here
    lengths = [3, 1, 6]
    rng = np.random.default_rng(0)
    requests = [rng.integers(1, 50, n).tolist() for n in lengths]
    rows = [
        model.inputs_from_request([Tensor("ids", "INT64", [len(r)], r)], 1000, flat=True)
        for r in requests
    ]
    batch = model.stack_inputs(rows)
    assert batch.tensors[0].shape == (4, 8)  # batch bucket 4, sequence bucket 8
    np.testing.assert_array_equal(batch.tensors[1].numpy().sum(axis=1), [3, 1, 6, 0])
    [out] = model.submit(batch).result()
    assert out.shape == (3, 3)
    with torch.inference_mode():  # each request alone, unpadded, through the same module
        for i, r in enumerate(requests):
            ids = torch.tensor([r])
            alone = module(ids, torch.ones_like(ids)).numpy()[0]
            np.testing.assert_allclose(out[i], alone, rtol=1e-5, atol=1e-6)


def test_a_sequence_beyond_the_largest_bucket_is_refused(
    tmp_path: Path, masked_arch: type[MaskedMean]
) -> None:
    save_seq(tmp_path)
    model = ModelRegistry(tmp_path, device=CPU).resolve("seq")
    with pytest.raises(RequestError) as info:
        model.inputs_from_request([Tensor("ids", "INT64", [9], list(range(9)))], 1000)
    assert info.value.code == BAD_SHAPE and "-1 in 1..8" in info.value.message
    with pytest.raises(RequestError) as info:  # the mask is not the client's to send
        model.inputs_from_request(
            [Tensor("ids", "INT64", [2], [1, 2]), Tensor("mask", "INT64", [2], [1, 1])], 1000
        )
    assert "unexpected inputs ['mask']" in info.value.message


def test_warm_up_covers_every_batch_bucket(tmp_path: Path, masked_arch: type[MaskedMean]) -> None:
    save_seq(tmp_path)
    model = ModelRegistry(tmp_path, device=CPU).resolve("seq")
    # An eager CPU model: each batch bucket at the shortest sequence bucket (nothing is
    # compiled or captured per shape; a compiled one, or one on CUDA, warms every shape).
    assert set(masked_arch.seen) == {(1, 4), (4, 4)}
    assert model.shapes() == [(1, 4), (1, 8), (4, 4), (4, 8)]
    assert set(model.batch_time_s) == {1, 4}  # seeds the batcher's estimates
    assert all(t > 0 for t in model.batch_time_s.values())


def test_models_load_lazily_and_serve_side_by_side(
    tmp_path: Path, masked_arch: type[MaskedMean]
) -> None:
    save_seq(tmp_path)
    save_mlp(tmp_path, "mlp")
    registry = ModelRegistry(tmp_path, device=CPU)
    assert registry.names == ["mlp", "seq"] and registry.loaded == []
    registry.resolve("mlp")
    assert [m.name for m in registry.loaded] == ["mlp"] and masked_arch.seen == []
    seq = registry.resolve("seq")
    assert sorted(m.name for m in registry.loaded) == ["mlp", "seq"]
    assert seq.pool is registry.pool is registry.resolve("mlp").pool


# -- memory budgets -------------------------------------------------------------------------


def origin(body: dict[str, Any], offset: int = 0) -> Origin:
    return Origin("t.requests", 0, offset, time.time() * 1000, json.dumps(body).encode())


def test_a_model_over_its_budget_is_refused_and_counted_while_others_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_mlp(tmp_path, "big", memory_budget_mb=0.001)  # ~5 KB of weights: over 1 KB
    save_mlp(tmp_path, "small", memory_budget_mb=1)
    registry = ModelRegistry(tmp_path, device=CPU)
    metrics = Metrics(CollectorRegistry())
    pipeline = Pipeline(Settings(model_dir=tmp_path), registry, None, metrics)
    loads: list[str] = []
    real_init = LoadedModel.__init__

    def counting_init(self: LoadedModel, name: str, *args: Any, **kwargs: Any) -> None:
        loads.append(name)
        real_init(self, name, *args, **kwargs)

    monkeypatch.setattr(LoadedModel, "__init__", counting_init)
    inputs = [{"name": "features", "datatype": "FP32", "shape": [16], "data": [0.5] * 16}]
    for i in range(2):
        with pytest.raises(RequestError) as info:
            pipeline.admit(origin({"id": f"b{i}", "model": "big", "inputs": inputs}))
        assert info.value.code == codec.MODEL_ERROR
        assert "model big:1 needs" in info.value.message
        assert "over its memory_budget_mb 0.001" in info.value.message
    assert loads == ["big"]  # refused once, not loaded again for every request
    assert registry.loaded == []
    failures = metrics.registry.get_sample_value(
        "sluice_model_load_failures_total", {"model": "big"}
    )
    assert failures == 2
    job = pipeline.admit(origin({"id": "s", "model": "small", "inputs": inputs}, offset=1))
    assert isinstance(job, Job)
    [outcome] = pipeline.infer([job])
    assert outcome.error is None and outcome.outputs is not None
    assert registry.resolve("small").memory_bytes > 0


# -- precision ------------------------------------------------------------------------------


def test_int8_outputs_are_within_tolerance_of_the_float_model(tmp_path: Path) -> None:
    module = save_mlp(tmp_path, "q", precision="int8")
    model = ModelRegistry(tmp_path, device=CPU).resolve("q")
    kinds = {type(m).__module__ for m in model.module.modules()}
    assert any(k.startswith("torch.ao.nn.quantized") for k in kinds), kinds
    x = features(32, seed=4)
    [out] = model.run([x])
    with torch.inference_mode():
        reference = module(torch.from_numpy(x)).numpy()
    assert out.dtype == np.float32
    scale = np.abs(reference).max()
    np.testing.assert_allclose(out, reference, atol=0.05 * scale)
    assert not np.array_equal(out, reference)  # really quantised
    assert np.mean(np.argmax(out, 1) == np.argmax(reference, 1)) >= 0.9


def test_fp16_on_cpu_falls_back_to_fp32_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module = save_mlp(tmp_path, "h", precision="fp16")
    with caplog.at_level(logging.WARNING, logger="pipeline.models.runtime"):
        model = ModelRegistry(tmp_path, device=CPU).resolve("h")
    assert "model h:1: precision fp16 needs CUDA; running fp32" in caplog.text
    assert {p.dtype for p in model.module.parameters()} == {torch.float32}
    x = features(2)
    with torch.inference_mode():
        # model.run pads the batch to its bucket; module(x) runs it unpadded: a matmul over
        # another shape may block and round its float sums differently (6e-8 seen on EPYC).
        np.testing.assert_allclose(
            model.run([x])[0], module(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-6
        )


def test_cuda_graphs_on_cpu_run_eagerly_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module = save_mlp(tmp_path, "g", cuda_graphs=True)
    with caplog.at_level(logging.WARNING, logger="pipeline.models.loaded"):
        model = ModelRegistry(tmp_path, device=CPU).resolve("g")
    assert "model g:1: cuda_graphs needs CUDA; running eagerly on cpu" in caplog.text
    assert model.graphs is None
    x = features(3)
    with torch.inference_mode():
        # Padded to the bucket vs unpadded: float sums over other shapes round differently
        # on some CPUs (6e-8 absolute seen on an AMD EPYC).
        np.testing.assert_allclose(
            model.run([x])[0], module(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-6
        )


# -- config checks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"precision": "fp8"}, "precision must be one of"),
        ({"compile": "yes"}, "compile must be true, false or a mode among"),
        ({"cuda_graphs": 1}, "cuda_graphs must be true or false, got 1"),
        ({"batch_buckets": [8, 4]}, "batch_buckets must be a non-empty, strictly increasing"),
        ({"memory_budget_mb": -5}, "memory_budget_mb must be a number > 0, got -5"),
        ({"time_budget_ms": 0}, "time_budget_ms must be a number > 0, got 0"),
        ({"max_delay_ms": -1}, "max_delay_ms must be a number >= 0, got -1"),
        ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1, got 0"),
        ({"mask_input": "nope"}, "mask_input must name an input of shape [-1], got 'nope'"),
        ({"seq_buckets": []}, "has a variable dimension: seq_buckets must be set"),
    ],
)
def test_bad_runtime_options_name_the_value(
    tmp_path: Path, masked_arch: type[MaskedMean], change: dict[str, Any], message: str
) -> None:
    save_seq(tmp_path)
    path = tmp_path / "seq" / "1" / "config.json"
    raw = json.loads(path.read_text())
    raw.update(change)
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError) as info:
        ModelConfig.read(path)
    assert message in str(info.value) and "config.json" in str(info.value)


def test_runtime_options_round_trip_through_config_json(
    tmp_path: Path, masked_arch: type[MaskedMean]
) -> None:
    save_seq(tmp_path, time_budget_ms=5.0, max_delay_ms=1.0, precision="bf16")
    cfg = ModelConfig.read(tmp_path / "seq" / "1" / "config.json")
    assert cfg == seq_config(time_budget_ms=5.0, max_delay_ms=1.0, precision="bf16")
    model = ModelRegistry(tmp_path, device=CPU).resolve("seq")
    policy = model.policy(max_delay_s=0.5)
    assert (policy.max_batch_size, policy.max_delay_s, policy.time_budget_s) == (4, 0.001, 0.005)
    assert policy.batch_buckets == (1, 4)


def test_the_readme_model_config_example_is_valid(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme.split("### Model config", 1)[1]
    block = section.split("```json\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "config.json"
    path.write_text(block)
    cfg = ModelConfig.read(path)
    assert (cfg.precision, cfg.mask_input, cfg.memory_budget_mb) == ("fp16", "attention_mask", 2048)
    assert cfg.seq_buckets == (32, 64, 128) and cfg.batch_buckets == (8, 32, 128, 256)
    assert [s.variable_axis for s in cfg.inputs] == [0, 0]
