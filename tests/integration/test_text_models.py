"""A real pretrained model on the real broker: all-MiniLM-L6-v2 (from its PyPI package)
serves text events, and its answers are checked against sentence-transformers itself."""

from __future__ import annotations

import json
import random
from pathlib import Path

import msgspec
import numpy as np
import pytest

from pipeline.client import Client
from pipeline.kafka import ensure_topics, pipeline_topics
from pipeline.models import DEMO_TEXTS, init_demo, init_minilm
from pipeline.protocol import codec
from tests.integration.conftest import make_settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def text_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo classifier (for readiness probes), MiniLM, and MiniLM with truncation off."""
    path = tmp_path_factory.mktemp("text-models")
    init_demo(path)
    minilm = init_minilm(path)
    strict = path / "minilm-strict" / "1"
    strict.mkdir(parents=True)
    (strict / "hf").symlink_to(minilm / "hf")
    config = json.loads((minilm / "config.json").read_text())
    config["text"]["truncation"] = False
    (strict / "config.json").write_text(json.dumps(config))
    return path


def _texts(n: int) -> list[str]:
    """Demo sentences, unicode, empty strings and texts past the 256-token maximum."""
    rng = random.Random(5)
    words = [t for _, s in DEMO_TEXTS for t in s.split()]
    unicode = ["naïve café", "日本語のテキスト", "Ünïcödé ✓ — “quotes”", "🙂🚀 emoji", "Привет мир",
               "مرحبا بالعالم", "e\u0301 combining", "tab\tand\nnewline"]  # fmt: skip
    texts: list[str] = []
    for i in range(n):
        kind = i % 10
        if kind == 0:
            texts.append("")
        elif kind == 1:
            texts.append(unicode[i % len(unicode)] + f" {i}")
        elif kind == 2 and i < 300:  # 30 long texts, early: they share batches
            texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(300, 700))))
        else:
            texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))))
    return texts


def _text_request(request_id: str, text: str, model: str = "minilm") -> dict[str, object]:
    return {
        "id": request_id,
        "model": model,
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}],
    }


def test_embeddings_equal_sentence_transformers(
    bootstrap: str, text_models: Path, start_workers
) -> None:
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    settings = make_settings(bootstrap, text_models, max_delay_s=0.02)
    ensure_topics(settings, pipeline_topics(settings, ["demo", "minilm"]))
    texts = _texts(1000)
    with Client(settings) as client:
        start_workers(settings, "fused").wait_ready(client)
        futures = [client.submit(_text_request(f"t-{i}", t)) for i, t in enumerate(texts)]
        client.flush()
        responses = [f.result(timeout=300) for f in futures]
    assert [r.status for r in responses] == ["ok"] * len(texts), [
        r.error for r in responses if r.status != "ok"
    ][:3]
    got = np.array([codec.tensor_values(r.outputs[0]) for r in responses])  # type: ignore[index]
    assert responses[0].outputs[0].name == "embedding"  # type: ignore[index]
    minilm = text_models / "minilm" / "1" / "hf"
    want = SentenceTransformer(str(minilm), device="cpu").encode(
        texts, normalize_embeddings=True, batch_size=64
    )
    diff = float(np.abs(got - want).max())
    print(f"max abs difference from sentence-transformers over {len(texts)} texts: {diff:.3g}")
    assert diff < 1e-4
    # The answers say which texts were cut at the model's 256 tokens.
    tokenizer = Tokenizer.from_file(str(minilm / "tokenizer.json"))
    tokenizer.no_truncation()
    long = [len(e.ids) > 256 for e in tokenizer.encode_batch(texts)]
    truncated = [bool(r.parameters and r.parameters.get("truncated")) for r in responses]
    assert truncated == long and sum(long) == 30


def test_bad_text_gets_its_reason_and_the_worker_goes_on(
    bootstrap: str, text_models: Path, start_workers
) -> None:
    settings = make_settings(bootstrap, text_models)
    ensure_topics(settings, pipeline_topics(settings, ["demo", "minilm", "minilm-strict"]))
    long_text = " ".join(["word"] * 400)
    with Client(settings) as client:
        start_workers(settings, "fused").wait_ready(client)
        # MessagePack may carry the text as raw bytes: these are not UTF-8.
        tensor = {"name": "text", "datatype": "BYTES", "shape": [1], "data": [b"\xff\xfe ok"]}
        bad = msgspec.msgpack.encode({"id": "not-utf8", "model": "minilm", "inputs": [tensor]})
        futures = {
            "not-utf8": client.submit_raw(
                "not-utf8", bad, headers={codec.CONTENT_TYPE_HEADER: codec.MSGPACK}
            ),
            "too-long": client.submit(_text_request("too-long", long_text, "minilm-strict")),
            "fits": client.submit(_text_request("fits", "short enough", "minilm-strict")),
            "numbers": client.submit(
                {
                    "id": "numbers",
                    "model": "minilm",
                    "inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}],
                }
            ),  # fmt: skip
            "after": client.submit(_text_request("after", "the worker goes on")),
        }
        client.flush()
        answers = {k: f.result(timeout=120) for k, f in futures.items()}
    codes = {k: (r.error.code if r.error else r.status) for k, r in answers.items()}
    assert codes == {
        "not-utf8": "invalid_utf8",
        "too-long": "text_too_long",
        "fits": "ok",
        "numbers": "bad_dtype",
        "after": "ok",
    }
    assert "402 tokens" in answers["too-long"].error.message  # type: ignore[union-attr]
