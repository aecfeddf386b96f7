"""A tiny fake language model (random logits, greedy longest-match tokenizer) for guided decoding."""

from __future__ import annotations

import string
from collections.abc import Iterator

import numpy as np

from openrealtime.backends.tool_calling import TokenVocab

_MULTI = [
    '",', '"}', '"]', ' "', '{"', '":', '}}', '},', ' {"', ' [', '["', '"}}', '"],', '",\n',
    "true", " true", "false", " false", "null", " null", "Paris", " Paris", "celsius", "fahrenheit",
    "get", "_weather", "weather", "_time", "location", "unit", "12", "2024", "-1", "..", "  ", "\n\n",
    "<tool_call>", "</tool_call>", "é", "日本", "ünï", ",\n", "}\n", "]}", " -", "00", "0.5",
]


class FakeLM:
    """Random logits; `bias` raises chosen tokens so values end sometimes."""

    def __init__(self, seed: int = 0, budget: int = 10_000, quote_bias: float = 0.0):
        pieces = [""]  # token 0: end of generation (unusable)
        pieces += [c for c in string.printable if c not in "\x0b\x0c"]
        pieces += _MULTI
        self.texts = pieces
        raw = [p.encode() for p in pieces] + [b"\xe6", b"\\u"]
        self.texts = [*pieces, "�", "\\u"]
        self.vocab = TokenVocab(raw, unusable=[0], eog=[0])
        self.rng = np.random.default_rng(seed)
        self.budget = budget
        self.evaluated: list[int] = []
        self.spent = 0  # tokens counted without being evaluated
        self.pauses = 0
        self.bias = np.zeros(len(raw), dtype=np.float32)
        for tok in self.vocab.quote:
            self.bias[tok] = quote_bias
        self._by_len = sorted(((p, i) for i, p in enumerate(pieces) if p), key=lambda x: -len(x[0]))

    def tokenize(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            for piece, tok in self._by_len:
                if text.startswith(piece, i):
                    out.append(tok)
                    i += len(piece)
                    break
            else:
                out.append(self.texts.index("?"))
                i += 1
        return out

    def room(self) -> int:
        return self.budget - len(self.evaluated) - self.spent

    def evaluate(self, tokens: list[int]) -> Iterator[None]:
        assert len(tokens) <= self.room(), "the decoder went over its budget"
        self.pauses += 1
        yield
        self.evaluated.extend(tokens)

    def spend(self, n: int) -> None:
        assert 0 <= n <= self.room(), "the decoder went over its budget"
        self.spent += n

    def logits(self) -> np.ndarray:
        return self.rng.normal(0, 2, len(self.vocab.pieces)).astype(np.float32) + self.bias

    def detok(self) -> str:
        return "".join(self.texts[t] for t in self.evaluated)
