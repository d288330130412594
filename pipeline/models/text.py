"""Text inputs: UTF-8 strings in a ``BYTES`` tensor, tokenized a batch at a time.

A request carries one string, ``{"name": "text", "datatype": "BYTES", "shape": [1],
"data": ["a sentence"]}`` (in MessagePack the string may be raw bytes). The worker checks it
is UTF-8 when it admits the request; the model's fast tokenizer (Hugging Face `tokenizers`)
encodes the whole batch in one call when the batch starts, cutting each text at the model's
maximum length (the answer then says ``"truncated": true``), or refusing it
(``text_too_long``) when the model's config turns truncation off.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.batching.scheduler import bucket_for
from pipeline.models.config import ModelConfig, ModelLoadError, TensorSpec, TextOptions
from pipeline.protocol.codec import (
    BAD_DTYPE,
    BAD_SHAPE,
    INVALID_UTF8,
    TEXT_TOO_LONG,
    RequestError,
    Tensor,
)


class TextInputs:
    """A text model's request check and batch tokenization."""

    def __init__(self, config: ModelConfig, path: Path, seq_buckets: Sequence[int]) -> None:
        from tokenizers import Tokenizer

        assert config.text is not None
        self.options: TextOptions = config.text
        file = path / self.options.tokenizer
        if not file.is_file():
            raise ModelLoadError(f"{file} is missing (a fast tokenizer's tokenizer.json)")
        self.tokenizer = Tokenizer.from_file(str(file))
        self.tokenizer.no_padding()  # padded here, to the batch's sequence bucket
        if self.options.truncation:
            self.tokenizer.enable_truncation(self.options.max_length)
        else:
            self.tokenizer.no_truncation()
        self.seq_buckets = seq_buckets
        # Without the character offsets, which nothing here reads (tokenizers >= 0.20).
        self._encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        self.names = [s.name for s in config.inputs]
        self.client_inputs = (TensorSpec(self.options.input, "BYTES", (1,)),)

    def check(self, tensor: Tensor) -> str:
        """The request's text, or `RequestError` saying what is wrong with it."""
        name = tensor.name
        if tensor.datatype != "BYTES":
            raise RequestError(BAD_DTYPE, f"input {name!r} must be BYTES (UTF-8 text), got "
                               f"{tensor.datatype}")  # fmt: skip
        if list(tensor.shape) not in ([1], [1, 1]):
            raise RequestError(BAD_SHAPE, f"input {name!r} holds one text: shape [1], got "
                               f"{list(tensor.shape)}")  # fmt: skip
        data = tensor.data
        value = data if isinstance(data, bytes) else (data[0] if len(data) == 1 else None)
        if isinstance(value, list) and len(value) == 1:  # [[text]] for shape [1, 1]
            value = value[0]
        if isinstance(value, str):
            return value
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RequestError(INVALID_UTF8, f"input {name!r} is not UTF-8 text ({exc.reason} "
                                   f"at byte {exc.start})") from None  # fmt: skip
        raise RequestError(BAD_SHAPE, f"input {name!r} must hold one string, got {data!r:.80}")

    def prepare(self, texts: Sequence[str]) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """The batch's model inputs, padded to its sequence bucket, and which rows were
        truncated. One tokenizer call for the whole batch; the padded arrays are filled
        without a numpy call per row (a text is one sequence: its token types are all 0)."""
        encodings = self._encode(list(texts))
        n, limit = len(texts), self.options.max_length
        lengths = np.fromiter((len(e) for e in encodings), np.int64, n)
        if not self.options.truncation and lengths.max() > limit:
            first = int(lengths.max())
            message = f"text is {first} tokens, the model takes {limit}"
            if n == 1:
                raise RequestError(TEXT_TOO_LONG, message)
            raise ValueError(f"{int((lengths > limit).sum())} texts over {limit} tokens")
        seq_len = bucket_for(int(lengths.max()), self.seq_buckets)
        mask = np.arange(seq_len) < lengths[:, None]
        ids = np.zeros((n, seq_len), dtype=np.int64)
        ids[mask] = np.fromiter(chain.from_iterable(e.ids for e in encodings), np.int64,
                                int(lengths.sum()))  # fmt: skip
        by_name = {
            "input_ids": ids,
            "attention_mask": mask.astype(np.int64),
            "token_type_ids": np.zeros((n, seq_len), dtype=np.int64),
        }
        truncated = np.zeros(n, dtype=bool)
        if self.options.truncation:  # only a text at the limit can have been cut
            for i in np.flatnonzero(lengths == limit):
                truncated[i] = bool(encodings[i].overflowing)
        return [by_name[name] for name in self.names], {"truncated": truncated}

    def example(self, seq_len: int | None) -> list[Any]:
        """A request row whose text is about ``seq_len`` tokens (for warm-up)."""
        return [" ".join(["word"] * max(1, (seq_len or 8) - 2))]
