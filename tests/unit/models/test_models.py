"""Models: the demo builder, the registry, loading every format, and input checking."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.models import (
    DEMO_FEATURES,
    DEMO_LABELS,
    MLP,
    LoadedModel,
    ModelConfig,
    ModelLoadError,
    ModelRegistry,
    TensorSpec,
    demo_config,
    init_demo,
    save_model,
)
from pipeline.protocol.codec import (
    BAD_DTYPE,
    BAD_SHAPE,
    OVERSIZE,
    UNKNOWN_MODEL,
    UNKNOWN_VERSION,
    RequestError,
    Tensor,
)

CPU = torch.device("cpu")

# torch 2.10+ deprecates torch.jit (script, save, load) with a FutureWarning; the torchscript
# format still works, and these tests are about sluice's use of it, not torch's roadmap.
TORCHSCRIPT_DEPRECATED = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning"
)


def features(rows: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, DEMO_FEATURES)).astype(np.float32)


def reference_module(version: str) -> MLP:
    """The demo's module, rebuilt the way init_demo builds it (same seed per version)."""
    torch.manual_seed({"1": 1, "2": 2}[version])
    return MLP(**demo_config().arch_config).eval()


def module_out(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


# -- init_demo and the registry -------------------------------------------------------------


def test_init_demo_layout(demo_dir: Path) -> None:
    v1, v2 = demo_dir / "demo" / "1", demo_dir / "demo" / "2"
    assert sorted(p.name for p in v1.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in v2.iterdir()) == ["config.json", "model.pt"]
    c1 = ModelConfig.read(v1 / "config.json")
    c2 = ModelConfig.read(v2 / "config.json")
    assert (c1.format, c2.format) == ("safetensors", "state_dict")
    assert c1.inputs == (TensorSpec("features", "FP32", (DEMO_FEATURES,)),)
    assert c1.outputs == (TensorSpec("logits", "FP32", (len(DEMO_LABELS),)),)
    assert c1.labels == DEMO_LABELS
    # The weights really are what the configs say they are.
    assert set(load_file(str(v1 / "model.safetensors"))) == set(reference_module("1").state_dict())
    state = torch.load(v2 / "model.pt", weights_only=True)
    assert set(state) == set(reference_module("2").state_dict())


def test_init_demo_is_idempotent_unless_forced(tmp_path: Path) -> None:
    paths = init_demo(tmp_path)
    weights = paths[0] / "model.safetensors"
    weights.write_bytes(b"sentinel")
    assert init_demo(tmp_path) == paths
    assert weights.read_bytes() == b"sentinel"
    init_demo(tmp_path, force=True)
    assert weights.read_bytes() != b"sentinel"


def test_registry_finds_models_and_versions(registry: ModelRegistry) -> None:
    assert registry.names == ["demo"]
    assert registry.versions("demo") == ["1", "2"]
    assert registry.versions("nope") == []


def test_resolve_picks_the_newest_by_default(registry: ModelRegistry) -> None:
    model = registry.resolve("demo")
    assert (model.name, model.version) == ("demo", "2")
    assert model.config.format == "state_dict"
    assert registry.resolve("demo", "1").config.format == "safetensors"
    # Loaded once, then cached.
    assert registry.resolve("demo") is model
    assert registry.resolve("demo", "2") is model


def test_versions_sort_numerically(tmp_path: Path) -> None:
    cfg = demo_config()
    for version in ("2", "10", "9"):
        torch.manual_seed(0)
        save_model(tmp_path, "m", version, MLP(**cfg.arch_config), cfg)
    registry = ModelRegistry(tmp_path, device=CPU)
    assert registry.versions("m") == ["2", "9", "10"]
    assert registry.resolve("m").version == "10"


def test_unknown_model_and_version(registry: ModelRegistry) -> None:
    with pytest.raises(RequestError) as info:
        registry.resolve("nope")
    assert info.value.code == UNKNOWN_MODEL
    assert "'nope'" in info.value.message
    with pytest.raises(RequestError) as info:
        registry.resolve("demo", "3")
    assert info.value.code == UNKNOWN_VERSION
    assert "'3'" in info.value.message
    with pytest.raises(RequestError) as info:
        registry.config("demo", "3")
    assert info.value.code == UNKNOWN_VERSION


def test_empty_or_missing_model_dir(tmp_path: Path) -> None:
    assert ModelRegistry(tmp_path / "absent", device=CPU).names == []
    registry = ModelRegistry(tmp_path, device=CPU)
    with pytest.raises(RequestError) as info:
        registry.resolve("demo")
    assert info.value.code == UNKNOWN_MODEL


def test_refresh_sees_new_versions(tmp_path: Path) -> None:
    init_demo(tmp_path)
    registry = ModelRegistry(tmp_path, device=CPU)
    cfg = demo_config()
    save_model(tmp_path, "demo", "3", MLP(**cfg.arch_config), cfg)
    assert registry.versions("demo") == ["1", "2"]
    registry.refresh()
    assert registry.versions("demo") == ["1", "2", "3"]
    assert registry.resolve("demo").version == "3"


def test_config_is_read_without_loading_weights(tmp_path: Path) -> None:
    init_demo(tmp_path)
    (tmp_path / "demo" / "1" / "model.safetensors").unlink()
    registry = ModelRegistry(tmp_path, device=CPU)
    assert registry.config("demo", "1").labels == DEMO_LABELS


def test_load_all(registry: ModelRegistry) -> None:
    assert [(m.name, m.version) for m in registry.load_all()] == [("demo", "1"), ("demo", "2")]


# -- outputs equal the original module's ----------------------------------------------------


@pytest.mark.parametrize("version", ["1", "2"])
def test_loaded_demo_matches_the_original_module(registry: ModelRegistry, version: str) -> None:
    x = features(5)
    [out] = registry.resolve("demo", version).run([x])
    assert out.shape == (5, len(DEMO_LABELS))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, module_out(reference_module(version), x), rtol=1e-6, atol=1e-6)


def test_the_two_demo_versions_differ(registry: ModelRegistry) -> None:
    x = features(2)
    [a] = registry.resolve("demo", "1").run([x])
    [b] = registry.resolve("demo", "2").run([x])
    assert not np.allclose(a, b)


@pytest.mark.parametrize(
    "fmt", ["safetensors", "state_dict", pytest.param("torchscript", marks=TORCHSCRIPT_DEPRECATED)]
)
def test_save_then_load_gives_the_module_outputs(tmp_path: Path, fmt: str) -> None:
    torch.manual_seed(42)
    cfg = demo_config(fmt)
    module = MLP(**cfg.arch_config).eval()
    path = save_model(tmp_path, "m", "1", module, cfg)
    assert (
        path
        / {"safetensors": "model.safetensors", "state_dict": "model.pt", "torchscript": "model.ts"}[
            fmt
        ]
    ).is_file()
    loaded = LoadedModel("m", "1", path, CPU)
    if fmt == "torchscript":
        assert isinstance(loaded.module, torch.jit.ScriptModule)
    x = features(7, seed=3)
    [out] = loaded.run([x])
    np.testing.assert_allclose(out, module_out(module, x), rtol=1e-6, atol=1e-6)


@TORCHSCRIPT_DEPRECATED
def test_torchscript_needs_no_architecture(tmp_path: Path) -> None:
    class Doubler(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 + 1

    cfg = ModelConfig(
        format="torchscript",
        inputs=(TensorSpec("x", "FP32", (3,)),),
        outputs=(TensorSpec("y", "FP32", (3,)),),
    )
    path = save_model(tmp_path, "double", "1", Doubler(), cfg)
    assert "arch" not in json.loads((path / "config.json").read_text())
    model = ModelRegistry(tmp_path, device=CPU).resolve("double")
    [out] = model.run([np.array([[1, 2, 3]], dtype=np.float32)])
    np.testing.assert_array_equal(out, [[3, 5, 7]])


def test_warm_up_runs_a_zero_batch(registry: ModelRegistry) -> None:
    registry.resolve("demo", "1").warm_up()


# -- bad model directories ------------------------------------------------------------------


def copy_version(demo_dir: Path, tmp_path: Path, version: str) -> Path:
    dst = tmp_path / "demo" / version
    shutil.copytree(demo_dir / "demo" / version, dst)
    return dst


@pytest.mark.parametrize(("version", "weights"), [("1", "model.safetensors"), ("2", "model.pt")])
def test_corrupt_weights_raise_model_load_error(
    demo_dir: Path, tmp_path: Path, version: str, weights: str
) -> None:
    path = copy_version(demo_dir, tmp_path, version)
    (path / weights).write_bytes(b"\x00not a weights file\xff" * 10)
    with pytest.raises(ModelLoadError, match=weights):
        LoadedModel("demo", version, path, CPU)
    with pytest.raises(ModelLoadError):
        ModelRegistry(tmp_path, device=CPU).resolve("demo", version)


def test_truncated_weights_raise_model_load_error(demo_dir: Path, tmp_path: Path) -> None:
    path = copy_version(demo_dir, tmp_path, "1")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        LoadedModel("demo", "1", path, CPU)


@TORCHSCRIPT_DEPRECATED
def test_corrupt_torchscript_raises_model_load_error(tmp_path: Path) -> None:
    cfg = demo_config("torchscript")
    torch.manual_seed(0)
    path = save_model(tmp_path, "m", "1", MLP(**cfg.arch_config), cfg)
    (path / "model.ts").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="model.ts"):
        LoadedModel("m", "1", path, CPU)


def test_weights_for_another_architecture_raise_model_load_error(tmp_path: Path) -> None:
    cfg = demo_config("state_dict")
    save_model(tmp_path, "m", "1", MLP(4, [8], 2), cfg)  # config says 16 -> 32 -> 4
    with pytest.raises(ModelLoadError):
        LoadedModel("m", "1", tmp_path / "m" / "1", CPU)


def test_missing_weights_raise_model_load_error(demo_dir: Path, tmp_path: Path) -> None:
    path = copy_version(demo_dir, tmp_path, "2")
    (path / "model.pt").unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        LoadedModel("demo", "2", path, CPU)


@pytest.mark.parametrize(
    "config",
    [
        "{not json",
        json.dumps({"format": "tensorflow", "inputs": [], "outputs": []}),
        json.dumps({"format": "safetensors", "arch": "vgg", "inputs": [], "outputs": []}),
        json.dumps({"format": "safetensors", "arch": "mlp", "outputs": []}),
        json.dumps(
            {
                "format": "safetensors",
                "arch": "mlp",
                "outputs": [],
                "inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1]}],
            }
        ),
    ],
)
def test_invalid_config_raises_model_load_error(
    demo_dir: Path, tmp_path: Path, config: str
) -> None:
    path = copy_version(demo_dir, tmp_path, "1")
    (path / "config.json").write_text(config)
    with pytest.raises(ModelLoadError, match="config.json"):
        LoadedModel("demo", "1", path, CPU)


class _Boom:
    """Unpickling this runs arbitrary code: what weights_only=True must refuse."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(_Boom.marker),))

    marker = Path("/nonexistent")


def test_state_dict_loading_refuses_pickled_objects(demo_dir: Path, tmp_path: Path) -> None:
    path = copy_version(demo_dir, tmp_path, "2")
    marker = tmp_path / "pwned"
    _Boom.marker = marker
    state = dict(torch.load(path / "model.pt", weights_only=True))
    state["payload"] = _Boom()  # type: ignore[assignment]
    with open(path / "model.pt", "wb") as f:
        torch.save(state, f, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(ModelLoadError, match="model.pt"):
        LoadedModel("demo", "2", path, CPU)
    assert not marker.exists()


# -- inputs_from_request --------------------------------------------------------------------


def tensor(shape: list[int], name: str = "features", datatype: str = "FP32") -> Tensor:
    n = int(np.prod(shape)) if shape else 1
    return Tensor(name=name, datatype=datatype, shape=shape, data=[0.25 * i for i in range(n)])


@pytest.mark.parametrize("shape", [[DEMO_FEATURES], [1, DEMO_FEATURES]])
def test_inputs_from_request_accepts_example_shapes(
    registry: ModelRegistry, shape: list[int]
) -> None:
    model = registry.resolve("demo")
    [array] = model.inputs_from_request([tensor(shape)], 1000)
    assert array.shape == (DEMO_FEATURES,)
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, 0.25 * np.arange(DEMO_FEATURES, dtype=np.float32))


@pytest.mark.parametrize(
    ("tensors", "code"),
    [
        ([tensor([DEMO_FEATURES], name="pixels")], BAD_SHAPE),
        ([tensor([DEMO_FEATURES]), tensor([DEMO_FEATURES], name="extra")], BAD_SHAPE),
        ([tensor([DEMO_FEATURES], datatype="FP64")], BAD_DTYPE),
        ([tensor([DEMO_FEATURES], datatype="INT32")], BAD_DTYPE),
        ([tensor([DEMO_FEATURES + 1])], BAD_SHAPE),
        ([tensor([2, DEMO_FEATURES])], BAD_SHAPE),
        ([tensor([4, 4])], BAD_SHAPE),
        ([tensor([1, 1, DEMO_FEATURES])], BAD_SHAPE),
        ([tensor([])], BAD_SHAPE),
        (
            [Tensor(name="features", datatype="FP32", shape=[DEMO_FEATURES], data=[1.0] * 15)],
            BAD_SHAPE,
        ),
        (
            [Tensor(name="features", datatype="FP32", shape=[DEMO_FEATURES], data=["a"] * 16)],
            BAD_DTYPE,
        ),
    ],
    ids=[
        "wrong-name",
        "extra-input",
        "fp64",
        "int32",
        "17-wide",
        "two-rows",
        "4x4",
        "rank-3",
        "scalar",
        "short-data",
        "strings",
    ],
)
def test_inputs_from_request_rejects(
    registry: ModelRegistry, tensors: list[Tensor], code: str
) -> None:
    with pytest.raises(RequestError) as info:
        registry.resolve("demo").inputs_from_request(tensors, 1000)
    assert info.value.code == code


def test_inputs_from_request_applies_the_element_limit(registry: ModelRegistry) -> None:
    with pytest.raises(RequestError) as info:
        registry.resolve("demo").inputs_from_request([tensor([DEMO_FEATURES])], 8)
    assert info.value.code == OVERSIZE


def test_inputs_from_request_names_what_is_wrong(registry: ModelRegistry) -> None:
    model = registry.resolve("demo")
    with pytest.raises(RequestError, match="'features'") as info:
        model.inputs_from_request([tensor([DEMO_FEATURES], name="pixels")], 1000)
    assert "pixels" in info.value.message
    with pytest.raises(RequestError, match=r"\[16\]"):
        model.inputs_from_request([tensor([17])], 1000)


@pytest.mark.parametrize(
    ("data", "kept"),
    [
        ([0.5] * (DEMO_FEATURES - 1) + [3], True),  # JSON ints are numbers too
        ([0.5] * (DEMO_FEATURES - 1) + [True], True),  # 1.0, as the full conversion has it
        ([0.5] * (DEMO_FEATURES - 1) + ["1.5"], False),
        ([0.5] * (DEMO_FEATURES - 1) + [[1.5]], False),
        ([0.5] * (DEMO_FEATURES - 1) + [None], False),
        ([0.5] * (DEMO_FEATURES - 1) + [10**400], False),  # no float holds it
        ([0.5] * (DEMO_FEATURES - 1), False),
    ],
)
def test_only_a_flat_list_of_numbers_is_kept_for_the_batch(
    registry: ModelRegistry, data: list[object], kept: bool
) -> None:
    """With ``flat``, a list of exactly the input's count of numbers is passed on as it is
    (the batch converts it, to the values the full conversion gives); anything else goes
    through the full conversion, which converts or rejects it with a reason."""
    model = registry.resolve("demo")
    request = Tensor(name="features", datatype="FP32", shape=[DEMO_FEATURES], data=data)
    try:
        [column] = model.inputs_from_request([request], 1000, flat=True)
    except RequestError:
        assert not kept
        return
    assert (column is data) == kept
    if kept:
        [full] = model.inputs_from_request([request], 1000)
        batch = model.stack_inputs([[column]])
        try:
            np.testing.assert_allclose(batch.arrays[0][0], full, rtol=1e-4, atol=1e-6)
        finally:
            batch.release()
