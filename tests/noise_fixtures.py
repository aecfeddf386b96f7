"""Test audio made at test time: white noise, speech babble, mixing at an SNR, WER, unfinished speech.

Everything is 16 kHz float32 in PCM16 scale unless a function says otherwise. Babble is several
Piper-synthesized sentences from different "talkers" (each resampled by a random factor, which
shifts pitch and tempo) overlapped at random offsets, like a room of people talking.
"""

from __future__ import annotations

import re

import numpy as np
import soxr

from tests.audio_fixtures import speak

RATE = 16_000

BABBLE_SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "I think we should meet at the station around noon tomorrow.",
    "She sells sea shells by the sea shore every single summer.",
    "Please remember to buy milk and bread on the way home tonight.",
    "The meeting has been moved to Thursday afternoon at three.",
    "My brother plays the guitar in a small band downtown.",
    "They walked along the beach until the sun went down.",
    "Nobody expected the old train to arrive so early today.",
]


def to_float(pcm16: bytes) -> np.ndarray:
    return np.frombuffer(pcm16, dtype="<i2").astype(np.float32)


def to_pcm16(x: np.ndarray) -> bytes:
    return np.clip(np.round(x), -32768, 32767).astype("<i2").tobytes()


def active_rms(x: np.ndarray, frame: int = 320) -> float:
    """RMS over the frames that carry speech (within 30 dB of the loudest frame)."""
    n = x.size // frame
    if n == 0:
        return float(np.sqrt(np.mean(x ** 2))) if x.size else 0.0
    energy = (x[: n * frame].reshape(n, frame) ** 2).mean(axis=1)
    keep = energy > energy.max() * 1e-3
    return float(np.sqrt(energy[keep].mean()))


def white(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def babble(n: int, talkers: int = 8, seed: int = 0) -> np.ndarray:
    """``n`` samples of overlapping speech from ``talkers`` voices (unit RMS)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(n, np.float32)
    for _ in range(talkers):
        factor = rng.uniform(0.8, 1.25)  # a different pitch and tempo per talker
        pos = -int(rng.integers(0, 3 * RATE))
        while pos < n:
            s = to_float(speak(BABBLE_SENTENCES[int(rng.integers(len(BABBLE_SENTENCES)))], RATE))
            s = soxr.resample(s, RATE, int(RATE * factor)).astype(np.float32)
            a, b = max(pos, 0), min(pos + s.size, n)
            if b > a:
                out[a:b] += s[a - pos:b - pos]
            pos += s.size + int(rng.integers(0, RATE // 4))
    return out / max(float(np.sqrt(np.mean(out ** 2))), 1e-9)


def noise(kind: str, n: int, seed: int = 0) -> np.ndarray:
    """Unit-RMS noise of ``kind`` ("white" or "babble")."""
    if kind == "white":
        return white(n, seed)
    if kind == "babble":
        return babble(n, seed=seed)
    raise ValueError(kind)


def scaled(noise_unit: np.ndarray, speech_rms: float, snr_db: float) -> np.ndarray:
    """Unit-RMS noise scaled so that speech at ``speech_rms`` sits ``snr_db`` above it."""
    return noise_unit * (speech_rms / 10 ** (snr_db / 20))


def mix(speech: np.ndarray, noise_unit: np.ndarray, snr_db: float, lead: int = 0) -> np.ndarray:
    """Speech starting ``lead`` samples into ``noise_unit`` (which must be long enough), at ``snr_db``."""
    out = scaled(noise_unit, active_rms(speech), snr_db).copy()
    out[lead:lead + speech.size] += speech
    return out


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def _number_words(token: str) -> list[str]:
    """Whisper writes "10" where the reference says "ten": compare both as words (0-99)."""
    if not token.isdigit() or int(token) > 99:
        return [token]
    n = int(token)
    if n < 20:
        return [_ONES[n]]
    return [_TENS[n // 10 - 2]] + ([_ONES[n % 10]] if n % 10 else [])


def _words(text: str) -> list[str]:
    text = text.lower().replace("-", " ")
    return [w for token in re.sub(r"[^a-z0-9' ]+", " ", text).split() for w in _number_words(token)]


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Word-level Levenshtein distance (substitutions, insertions, deletions)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance in words, reference length) after lower-casing and dropping punctuation."""
    ref, hyp = _words(reference), _words(hypothesis)
    return edit_distance(ref, hyp), len(ref)


def wer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus word error rate."""
    errors = total = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        e, n = word_errors(ref, hyp)
        errors += e
        total += n
    return errors / max(total, 1)


# ---------------------------------------------------------------- unfinished sentences


def quiet_gaps(pcm16: bytes, rate: int = RATE, min_ms: int = 60, level: float = 150.0) -> list[tuple[int, int]]:
    """(start, end) sample ranges inside ``pcm16`` where the 10 ms RMS stays below ``level``."""
    x = to_float(pcm16)
    hop = rate // 100
    n = x.size // hop
    quiet = np.sqrt((x[: n * hop].reshape(n, hop) ** 2).mean(axis=1)) < level
    gaps, run = [], 0
    for i, q in enumerate(quiet):
        if q:
            run += 1
            continue
        if run * 10 >= min_ms and i - run > 0:
            gaps.append(((i - run) * hop, i * hop))
        run = 0
    return gaps


def speak_split(text: str, rate: int = 24_000) -> tuple[bytes, bytes]:
    """``text`` spoken, split at its longest inner pause: (the speech before it, the speech after).

    Write a comma where the speaker stops ("I would like to order a, pizza with cheese."): Piper
    pauses there with the continuing intonation of an unfinished sentence, unlike synthesizing
    "I would like to order a" alone, which it ends like a finished one.
    """
    pcm = speak(text, rate)
    gaps = quiet_gaps(pcm, rate)
    if not gaps:
        raise ValueError(f"no pause in {text!r}")
    start, end = max(gaps, key=lambda g: g[1] - g[0])
    return pcm[: start * 2], pcm[end * 2:]


def speech_ms(pcm16: bytes, rate: int = 24_000) -> float:
    """Duration up to the last audible 10 ms (Piper leaves some silence at the end)."""
    x = to_float(pcm16)
    loud = np.nonzero(np.abs(x) > 300)[0]
    return (loud[-1] + 1) * 1000 / rate if loud.size else 0.0
