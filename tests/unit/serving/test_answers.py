"""A batch of JSON answers joined from shared and per-row pieces (`_json_answers`) is, byte
for byte, what encoding each answer's `Response` gives (`_answers`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pipeline.protocol import codec
from pipeline.serving.responses import Answers, _answers, _json_answers, _top_k

IDS = ["r0", 'quote"d', "new\nline", "naïve ünïcode", "back\\slash", "x" * 200, "tab\there"]


def batch(seed: int, n: int, outputs: list[np.ndarray], labels: tuple[str, ...]) -> Any:
    """(raw, top, times, metas) for ``n`` rows, as `Responses._responses` builds them."""
    rng = np.random.default_rng(seed)
    raw = []
    for k, out in enumerate(outputs):
        flat = out.reshape(n, -1)
        if out.dtype == np.object_:
            raw.append((f"out{k}", "BYTES", list(out.shape[1:]), flat.tolist(), None))
        else:
            datatype = codec.DATATYPE_OF[out.dtype]
            raw.append((f"out{k}", datatype, list(out.shape[1:]), flat.tolist(), None))
    ks = [int(rng.integers(1, 4)) for _ in range(n)] if seed % 2 else [1] * n
    top = _top_k(labels, outputs, ks)
    times = tuple(np.round(rng.exponential(5.0, (3, n)), 3).tolist())
    metas = [
        codec.ResultRecord(id=IDS[i % len(IDS)] + str(i), model="m", model_version="1",
                           outputs=[], batch_size=n, top_k=ks[i])
        for i in range(n)
    ]  # fmt: skip
    return raw, top, times, metas


@pytest.mark.parametrize("seed", range(6))
def test_joined_answers_are_the_encoded_responses(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    logits = rng.normal(0, 3, (n, 4)).astype(np.float32)
    logits[0, 0] = -0.0
    logits[-1, 1] = 1e-7 if n > 1 else 3e20
    outputs = [
        logits,
        rng.integers(-(2**40), 2**40, (n, 2, 3)).astype(np.int64),
        rng.random((n,)).astype(np.float64),
        np.array([[f"s{i}", "é\n"] for i in range(n)], dtype=object),
    ]
    for labels in (("a", "b", 'c"', "d\n"), ()):
        raw, top, times, metas = batch(seed, n, outputs, labels)
        assert (top is None) == (not labels)
        answers = Answers("model-x", "v1.2", raw, top, times, metas)
        want = _answers(answers, [False] * n)
        got = _json_answers(answers)
        assert got == want
        decoded = codec.decode_response(got[-1])
        assert decoded.id == metas[-1].id and decoded.timings is not None


def test_no_outputs_but_labels_and_none_at_all() -> None:
    raw, top, times, metas = batch(1, 3, [np.zeros((3, 2), np.float32)], ("a", "b"))
    for answers in (
        Answers("m", "1", [], top, times, metas),
        Answers("m", "1", [], None, times, metas),
    ):
        assert _json_answers(answers) == _answers(answers, [False] * 3)
