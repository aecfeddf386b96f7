"""Cut streaming LLM text into clauses for speech synthesis.

Speaking starts as soon as the first clause is complete, so the first cut is eager (a comma
will do once there are a few words); later cuts prefer sentence ends so prosody stays natural.
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*\s+|\n+")
_SOFT_BREAK = re.compile(r"[,;:\u2014\u2013]\s+")  # comma, semicolon, colon, em/en dash


class ClauseSplitter:
    def __init__(self, first_min_chars: int = 12, min_chars: int = 40, max_chars: int = 220):
        self.first_min_chars = first_min_chars
        self.min_chars = min_chars
        self.max_chars = max_chars
        self._buf = ""
        self._emitted = 0

    def push(self, text: str) -> list[str]:
        """Add streamed text; returns the clauses completed by it (whitespace preserved)."""
        self._buf += text
        out: list[str] = []
        while True:
            cut = self._find_cut()
            if cut is None:
                return out
            clause, self._buf = self._buf[:cut], self._buf[cut:]
            if clause.strip():
                out.append(clause)
                self._emitted += 1
            elif out:
                out[-1] += clause
            else:
                self._buf = clause + self._buf
                return out

    def flush(self) -> str:
        rest, self._buf = self._buf, ""
        return rest

    def _find_cut(self) -> int | None:
        buf = self._buf
        m = _SENTENCE_END.search(buf)
        if m is not None and len(buf[:m.start()].strip()) >= 2:
            return m.end()
        min_chars = self.first_min_chars if self._emitted == 0 else self.min_chars
        for m in _SOFT_BREAK.finditer(buf):
            if m.start() >= min_chars:
                return m.end()
        if len(buf) > self.max_chars:
            space = buf.rfind(" ", 0, self.max_chars)
            return space + 1 if space > 0 else self.max_chars
        return None


_MARKUP = re.compile(r"[*_`#~>|]+|\[(?P<label>[^\]]*)\]\([^)]*\)")


def speakable(text: str) -> str:
    """Text as it should be read aloud: markdown symbols dropped (TTS would say "asterisk")."""
    return " ".join(_MARKUP.sub(lambda m: m.group("label") or "", text).split())
