"""Sample-rate conversion of mono PCM16 with soxr (streaming keeps filter state across chunks)."""

from __future__ import annotations

import numpy as np
import soxr


class StreamResampler:
    """Resamples a continuous stream chunk by chunk without clicks at chunk borders."""

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ"):
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = None if in_rate == out_rate else soxr.ResampleStream(
            in_rate, out_rate, 1, dtype="int16", quality=quality)

    def process(self, pcm16: bytes, last: bool = False) -> bytes:
        if self._stream is None:
            return pcm16
        samples = np.frombuffer(pcm16, dtype="<i2")
        return self._stream.resample_chunk(samples, last=last).astype("<i2", copy=False).tobytes()

    def flush(self) -> bytes:
        return self.process(b"", last=True)


def resample(pcm16: bytes, in_rate: int, out_rate: int) -> bytes:
    """One-shot conversion of a complete clip."""
    if in_rate == out_rate or not pcm16:
        return pcm16
    samples = np.frombuffer(pcm16, dtype="<i2")
    return soxr.resample(samples, in_rate, out_rate, quality="HQ").astype("<i2", copy=False).tobytes()


def duration_ms(pcm16: bytes, rate: int) -> int:
    return len(pcm16) // 2 * 1000 // rate
