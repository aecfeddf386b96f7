"""Cut streaming LLM text into clauses for speech synthesis.

Speaking starts as soon as the first clause is complete, so the first cut is eager (a comma
will do once there are a few words, and with ``first_words`` so will that many words with no
break at all: the first audio then waits for a few tokens, not for a whole clause); later cuts
prefer sentence ends so prosody stays natural.
No clause is longer than ``max_chars`` (plus the whitespace around it): text without punctuation
is cut at a word boundary, so neither the pending text nor one synthesis run grows with it.
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*\s+|\n+")
_SOFT_BREAK = re.compile(r"[,;:\u2014\u2013]\s+")  # comma, semicolon, colon, em/en dash
_WORD = re.compile(r"\S+\s+")  # a word known to be complete: whitespace follows it


class ClauseSplitter:
    """Streamed text in, speakable clauses out, each as soon as it is complete."""

    # max_chars matches the Piper backend's piece bound (MAX_PIECE_CHARS), so a clause is never
    # cut again there; it is not imported, to keep that GPL-backed module out of the engine.
    def __init__(self, first_min_chars: int = 12, min_chars: int = 40, max_chars: int = 200,
                 first_words: int = 0):
        self.first_min_chars = first_min_chars
        self.first_words = first_words
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
        """End of the next clause in the buffer, or None to wait for more text.

        Lengths count from the first non-space character, so leading whitespace never makes the
        cut land inside it (which would yield an empty clause and stall the buffer).
        """
        buf = self._buf
        start = len(buf) - len(buf.lstrip())
        limit = start + self.max_chars
        for m in _SENTENCE_END.finditer(buf):
            if m.start() > limit:
                break
            if len(buf[:m.start()].strip()) >= 2:
                return m.end()
        min_chars = self.first_min_chars if self._emitted == 0 else self.min_chars
        for m in _SOFT_BREAK.finditer(buf):
            if m.start() > limit:
                break
            if m.start() >= min_chars:
                return m.end()
        if self._emitted == 0 and self.first_words > 0:
            for n, m in enumerate(_WORD.finditer(buf, start), 1):
                if m.start() > limit:
                    break
                if n >= self.first_words and len(buf[:m.end()].strip()) >= self.first_min_chars:
                    return m.end()
        if len(buf) <= limit:
            return None
        for i in range(limit, start, -1):  # the last word boundary within the limit
            if buf[i].isspace():
                return i + 1
        return limit  # one "word" longer than max_chars


_MARKUP = re.compile(r"[*_`#~>|]+|\[(?P<label>[^\]]*)\]\([^)]*\)")


def speakable(text: str) -> str:
    """Text as it should be read aloud: markdown symbols dropped (TTS would say "asterisk")."""
    return " ".join(_MARKUP.sub(lambda m: m.group("label") or "", text).split())
