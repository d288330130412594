"""The user's own models on the real broker, checked against their own libraries:

- a fraud model exported to ONNX, fed named record fields, answers what onnxruntime's
  `InferenceSession.run` gives on the same feature vectors;
- a `torch.export` program answers what the eager module gives;
- an image model decodes the PNG and JPEG bytes a producer sends;
- a Python handler with its own pre- and post-processing answers a request kcat produced;
- bad records and images are answered with their reasons while the worker goes on.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.client import Client
from pipeline.kafka import ensure_topics, pipeline_topics
from pipeline.models import init_demo
from pipeline.models.importer import import_model
from pipeline.protocol import codec
from tests.integration.conftest import make_settings

pytestmark = [
    pytest.mark.integration,
    # torch 2.10+ deprecates torch.jit with a FutureWarning; TorchScript is still served.
    pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning"),
]

FIELDS = ["amount", "hour", "merchant_risk", "card_age_days", "country_risk", "velocity_1h",
          "velocity_24h", "is_online"]  # fmt: skip
MODELS = ["demo", "fraud", "mlp", "pixels", "shout"]


class MeanPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def user_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("user-models")
    models, artifacts = root / "models", root / "artifacts"
    artifacts.mkdir()
    init_demo(models)
    torch.manual_seed(0)
    fraud = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            fraud, (torch.randn(2, 8),), str(artifacts / "fraud.onnx"), input_names=["x"],
            output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},),
            dynamo=True, verbose=False,
        )  # fmt: skip
    path, _ = import_model(artifacts / "fraud.onnx", models, "fraud")
    config = json.loads((path / "config.json").read_text())
    config["fields"] = FIELDS  # producers send named fields, in any order
    config["labels"] = ["legit", "fraud"]
    (path / "config.json").write_text(json.dumps(config))

    mlp = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).eval()
    batch = torch.export.Dim("batch", max=1024)
    program = torch.export.export(mlp, (torch.randn(2, 6),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(artifacts / "mlp.pt2"))
    torch.save(mlp.state_dict(), artifacts / "mlp.state.pt")
    import_model(artifacts / "mlp.pt2", models, "mlp")

    torch.jit.save(torch.jit.script(MeanPool()), str(artifacts / "pool.ts"))
    pixels, _ = import_model(artifacts / "pool.ts", models, "pixels",
                             inputs={"x": ("FP32", (3, 16, 16))})  # fmt: skip
    config = json.loads((pixels / "config.json").read_text())
    config["image"] = {"size": [16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    (pixels / "config.json").write_text(json.dumps(config))

    shout = models / "shout" / "1"
    shout.mkdir(parents=True)
    (shout / "shouting.py").write_text(textwrap.dedent('''
        import numpy as np
        from pipeline.models import Handler

        class Shout(Handler):
            def load(self, path, device, config):
                self.suffix = (path / "suffix.txt").read_text().strip()

            def preprocess(self, requests):
                return [r["text"][0].strip() for r in requests]

            def predict(self, texts):
                return [t.upper() + self.suffix for t in texts]

            def postprocess(self, outputs, n):
                return {"shout": np.array([[o] for o in outputs], dtype=object),
                        "length": np.array([[len(o)] for o in outputs], dtype=np.int64)}
    '''))  # fmt: skip
    (shout / "suffix.txt").write_text("!\n")
    (shout / "config.json").write_text(json.dumps({
        "format": "handler", "handler": "shouting:Shout",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1]}],
        "outputs": [{"name": "shout", "datatype": "BYTES", "shape": [1]},
                    {"name": "length", "datatype": "INT64", "shape": [1]}],
    }))  # fmt: skip
    return root


def _fields(i: int, rng: np.random.Generator) -> tuple[list[dict[str, object]], np.ndarray]:
    values = rng.standard_normal(len(FIELDS)).astype(np.float32)
    tensors = [{"name": f, "datatype": "FP32", "shape": [1], "data": [float(v)]}
               for f, v in zip(FIELDS, values, strict=True)]  # fmt: skip
    order = rng.permutation(len(FIELDS)) if i % 2 else range(len(FIELDS))
    return [tensors[j] for j in order], values


def _png(seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_user_models_answer_as_their_libraries_do(
    bootstrap: str, user_models: Path, start_workers
) -> None:
    import onnxruntime as ort
    from PIL import Image

    settings = make_settings(bootstrap, user_models / "models")
    ensure_topics(settings, pipeline_topics(settings, MODELS))
    rng = np.random.default_rng(3)
    mlp = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).eval()
    mlp.load_state_dict(torch.load(user_models / "artifacts" / "mlp.state.pt", weights_only=True))
    with Client(settings) as client:
        workers = start_workers(settings, "fused")
        workers.wait_ready(client)
        fraud, vectors = [], []
        for i in range(40):
            tensors, values = _fields(i, rng)
            vectors.append(values)
            fraud.append(client.submit({"id": f"fraud-{i}", "model": "fraud", "inputs": tensors}))
        xs = rng.standard_normal((40, 6)).astype(np.float32)
        exported = [
            client.submit({"id": f"mlp-{i}", "model": "mlp", "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [6], "data": x.tolist()}]})
            for i, x in enumerate(xs)
        ]  # fmt: skip
        png = _png(1)
        image = {"name": "image", "datatype": "BYTES", "shape": [1]}
        jpeg_buf = io.BytesIO()
        Image.open(io.BytesIO(png)).save(jpeg_buf, format="JPEG")
        cut_jpeg = jpeg_buf.getvalue()[:200]  # a valid header, then nothing
        images = {
            "png": client.submit({"id": "png", "model": "pixels", "inputs": [
                {**image, "data": base64.b64encode(png).decode()}]}),
            "jpeg": client.submit({"id": "jpeg", "model": "pixels", "inputs": [
                {**image, "data": base64.b64encode(jpeg_buf.getvalue()).decode()}]}),
            "not-an-image": client.submit({"id": "not-an-image", "model": "pixels", "inputs": [
                {**image, "data": base64.b64encode(b"GIF89a nope").decode()}]}),
            "cut-jpeg": client.submit({"id": "cut-jpeg", "model": "pixels", "inputs": [
                {**image, "data": base64.b64encode(cut_jpeg).decode()}]}),
        }  # fmt: skip
        tensors, _ = _fields(0, rng)
        missing = client.submit({"id": "missing", "model": "fraud", "inputs": tensors[1:]})
        words = client.submit({"id": "words", "model": "fraud", "inputs": [
            *tensors[:-1], {"name": FIELDS[-1], "datatype": "BYTES", "shape": [1],
                            "data": ["yes"]}]})  # fmt: skip
        client.flush()
        fraud_answers = [f.result(timeout=120) for f in fraud]
        mlp_answers = [f.result(timeout=120) for f in exported]
        image_answers = {k: f.result(timeout=120) for k, f in images.items()}
        missing_answer, words_answer = missing.result(timeout=60), words.result(timeout=60)
        assert workers.alive()

    for answers in (fraud_answers, mlp_answers):
        assert [r.status for r in answers] == ["ok"] * len(answers), answers[0].error
    session = ort.InferenceSession(str(user_models / "artifacts" / "fraud.onnx"))
    [want] = session.run(["logits"], {"x": np.stack(vectors)})
    got = np.array([codec.tensor_values(r.outputs[0]) for r in fraud_answers])  # type: ignore[index]
    diff = float(np.abs(got - want).max())
    print(f"ONNX: max abs difference from onnxruntime: {diff:.3g}")
    assert diff < 1e-5
    assert {r.outputs[2].name for r in fraud_answers} == {"scores"}  # type: ignore[index]

    with torch.inference_mode():
        want = mlp(torch.from_numpy(xs)).numpy()
    got = np.array([codec.tensor_values(r.outputs[0]) for r in mlp_answers])  # type: ignore[index]
    diff = float(np.abs(got - want).max())
    print(f"torch.export: max abs difference from the eager module: {diff:.3g}")
    assert diff < 1e-5

    codes = {k: r.error.code if r.error else r.status for k, r in image_answers.items()}
    assert codes == {"png": "ok", "jpeg": "ok", "not-an-image": "bad_image",
                     "cut-jpeg": "bad_image"}  # fmt: skip
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB").resize((16, 16),
                     Image.Resampling.BILINEAR), dtype=np.float32)  # fmt: skip
    want = ((rgb / 255.0 - 0.5) / 0.5).mean(axis=(0, 1))
    got = codec.tensor_values(image_answers["png"].outputs[0])  # type: ignore[index]
    assert np.allclose(got, want, atol=1e-5)

    assert missing_answer.error is not None and missing_answer.error.code == "bad_field"
    assert repr(FIELDS[0]) in missing_answer.error.message
    assert words_answer.error is not None and words_answer.error.code == "bad_field"
    assert repr(FIELDS[-1]) in words_answer.error.message


def test_handler_answers_a_request_kcat_produced(
    bootstrap: str, user_models: Path, start_workers
) -> None:
    assert shutil.which("kcat"), "kcat (Debian package kcat) must be installed: make sysdeps"
    settings = make_settings(bootstrap, user_models / "models")
    ensure_topics(settings, pipeline_topics(settings, MODELS))
    text = {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["  stream me  "]}
    request = {"id": "kcat-shout", "model": "shout", "inputs": [text]}
    with Client(settings) as client:
        start_workers(settings, "fused").wait_ready(client)
        future = client.expect("kcat-shout")
        subprocess.run(
            ["kcat", "-P", "-b", settings.bootstrap_servers(), "-t", settings.requests_topic,
             "-k", "kcat-shout"],
            input=json.dumps(request).encode(), check=True, timeout=30,
        )  # fmt: skip
        response = future.result(timeout=60)
    assert response.status == "ok", response.error
    outputs = {t.name: t for t in response.outputs or []}
    assert outputs["shout"].datatype == "BYTES" and outputs["shout"].data == ["STREAM ME!"]
    assert outputs["length"].data == [10]
