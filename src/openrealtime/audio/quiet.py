"""Cutting the digital silence a TTS puts around its speech, where it only delays or gaps the reply.

Piper (the joe voice) starts each synthesis with 25-45 ms of samples within a few steps of zero
and ends it with ~100 ms of them after the voice has decayed. Before a reply's first word, that
silence is latency every listener waits through; between a first piece cut mid-sentence
(`tts_first_words`) and the rest of that sentence, the two add up to a ~150 ms pause no speaker
makes. Both are trimmed down to a few milliseconds; pauses at punctuation are left as synthesized.
"""

from __future__ import annotations

import numpy as np

# |sample| at or below this is silence: -60 dBFS, far under anything audible in speech, and above
# the TTS's dither-like floor (2-5 for Piper).
QUIET = 32
LEAD_KEEP_MS = 5  # kept before the first sound, so an onset is never clipped
TAIL_KEEP_MS = 20  # kept after the last sound, for the decay below QUIET


def _loud(samples: np.ndarray) -> np.ndarray:
    """Indices of the samples above QUIET."""
    return np.flatnonzero(np.abs(samples.astype(np.int32)) > QUIET)


class LeadTrimmer:
    """Drops leading quiet samples of one stream of PCM16 chunks, up to its first sound.

    Stateful, because a streaming TTS may send whole chunks of silence before its first sound.
    """

    def __init__(self, rate: int, keep_ms: int = LEAD_KEEP_MS) -> None:
        self._keep = rate * keep_ms // 1000
        self._quiet = np.zeros(0, dtype="<i2")  # the last `keep` samples of all-quiet chunks so far
        self.done = False  # the first sound went out: everything passes unchanged from now on
        self.dropped = 0  # samples

    def process(self, pcm16: bytes) -> bytes:
        """The chunk without the quiet before the stream's first sound (but `keep_ms` of it)."""
        if self.done or not pcm16:
            return pcm16
        samples = np.frombuffer(pcm16, dtype="<i2", count=len(pcm16) // 2)
        loud = _loud(samples)
        joined = np.concatenate([self._quiet, samples])
        if not loud.size:  # still silence: keep only its last few ms, in case sound follows
            keep = min(self._keep, joined.size)
            self.dropped += joined.size - keep
            self._quiet = joined[joined.size - keep:]
            return b""
        self.done = True
        start = self._quiet.size + int(loud[0])  # in `joined`
        begin = max(0, start - self._keep)
        self.dropped += begin
        self._quiet = self._quiet[:0]
        return joined[begin:].tobytes()


def split_tail(pcm16: bytes) -> tuple[bytes, bytes]:
    """(the chunk up to its last sound, the quiet samples after it); ("", chunk) if all quiet."""
    samples = np.frombuffer(pcm16, dtype="<i2", count=len(pcm16) // 2)
    loud = _loud(samples)
    end = int(loud[-1]) + 1 if loud.size else 0
    return pcm16[: end * 2], pcm16[end * 2: samples.size * 2]


def tail_keep_bytes(rate: int, keep_ms: int = TAIL_KEEP_MS) -> int:
    """How much of a trailing silence to keep, in bytes of PCM16."""
    return rate * keep_ms // 1000 * 2
