"""End-of-turn detection with smart-turn v3 (an audio-only "is the speaker done?" classifier).

The model is the ONNX file that ships inside the ``pipecat-ai`` wheel
(``pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx``, 8.7 MB, BSD-2-Clause). Only that
data file is used: the path is found with ``importlib.util.find_spec`` so pipecat itself (and its
large dependency tree) is never imported, and ``pip install --no-deps pipecat-ai`` is enough.

Model contract (read from the graph and pipecat's public inference code):

- input ``input_features``: float32 ``(batch, 80, 800)``, Whisper log-mel features of exactly 8 s
  of 16 kHz audio. Audio longer than 8 s keeps its *last* 8 s; shorter audio is zero-padded at the
  *start*, so the end of the turn always sits at the right edge of the window. Before the
  spectrogram the padded 8 s waveform is normalised to zero mean and unit variance.
- features: 400-sample periodic Hann window, hop 160, reflect-centred STFT, power spectrum,
  80 Slaney mel bands over 0-8 kHz, ``log10(max(mel, 1e-10))``, the last STFT frame dropped
  (801 -> 800), clamped to ``max - 8`` and mapped with ``(x + 4) / 4``.
- output ``logits``: float32 ``(batch, 1)``, already a sigmoid probability that the turn is complete.

One prediction costs ~25-40 ms on one core, so it runs in a worker thread, never on the loop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from openrealtime.backends.onnx import OnnxModel

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
WINDOW_S = 8
WINDOW_SAMPLES = SAMPLE_RATE * WINDOW_S
N_FFT = 400
HOP = 160
N_MELS = 80
_MODEL_FILE = "smart-turn-v3.2-cpu.onnx"


def default_model_path() -> Path | None:
    """The smart-turn file inside the installed pipecat-ai package, found without importing pipecat."""
    try:
        spec = importlib.util.find_spec("pipecat")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        candidate = Path(base) / "audio" / "turn" / "smart_turn" / "data" / _MODEL_FILE
        if candidate.is_file():
            return candidate
    return None


def _slaney_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz * 3.0 / 200.0
    log_part = 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(hz >= 1000.0, log_part, linear)


def _slaney_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * 200.0 / 3.0
    log_part = 1000.0 * np.exp((mel - 15.0) * (np.log(6.4) / 27.0))
    return np.where(mel >= 15.0, log_part, linear)


def _mel_filterbank() -> np.ndarray:
    """(N_MELS, N_FFT // 2 + 1) triangular filters, area-normalised (librosa's norm='slaney')."""
    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges = _slaney_hz(np.linspace(_slaney_mel(0.0), _slaney_mel(SAMPLE_RATE / 2), N_MELS + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (fft_hz[None, :] - lo) / (mid - lo)
    falling = (hi - fft_hz[None, :]) / (hi - mid)
    tri = np.maximum(0.0, np.minimum(rising, falling))
    return tri * (2.0 / (hi - lo))


_MEL = _mel_filterbank().astype(np.float32)
_HANN = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)  # periodic


def fit_window(audio: np.ndarray) -> np.ndarray:
    """The last 8 s of ``audio`` (float32), zero-padded at the start to exactly 8 s."""
    audio = np.asarray(audio, dtype=np.float32)[-WINDOW_SAMPLES:]
    if audio.size < WINDOW_SAMPLES:
        audio = np.concatenate((np.zeros(WINDOW_SAMPLES - audio.size, np.float32), audio))
    return audio


def log_mel_features(audio: np.ndarray) -> np.ndarray:
    """Whisper-style (80, 800) log-mel features of an 8 s, 16 kHz window (see the module docstring)."""
    x = fit_window(audio)
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x, (N_FFT // 2, N_FFT // 2), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]  # (801, 400)
    power = np.abs(np.fft.rfft(frames * _HANN, axis=-1)) ** 2  # (801, 201)
    mel = _MEL @ power[:-1].T.astype(np.float32)  # (80, 800)
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


class SmartTurnV3(OnnxModel):
    """Implements ``TurnDetector``: P(the turn is complete) for the audio of a turn so far."""

    name = "smart-turn-v3.2"
    sample_rate = SAMPLE_RATE

    label = "smart-turn model"

    def __init__(self, path: str | Path | None = None, *, threads: int = 1):
        super().__init__(path, default_model_path(), threads=threads,
                         missing_hint="install it with `pip install --no-deps pipecat-ai==1.14.0` "
                                      "(the wheel ships smart-turn-v3.2-cpu.onnx) or pass the path of the ONNX file")
        # Recent prediction latencies (ms, features + inference), for logs and the bench.
        self.latencies_ms: list[float] = []

    def _check(self, session: Any) -> None:
        inputs = session.get_inputs()
        if [i.name for i in inputs] != ["input_features"] or list(inputs[0].shape[1:]) != [80, 800]:
            raise RuntimeError(f"{self.path.name} is not a smart-turn v3 model: "
                               f"{[(i.name, i.shape) for i in inputs]}")

    async def warmup(self) -> None:
        """Load the model and run it once, in a thread (the first run allocates its buffers)."""
        await asyncio.to_thread(self.predict_sync, bytes(SAMPLE_RATE))

    def predict_sync(self, pcm16_16k: bytes) -> float:
        """Blocking: P(complete) for the turn's audio (16 kHz mono PCM16; only the last 8 s count)."""
        t0 = time.perf_counter()
        session = self.load()
        n = len(pcm16_16k) // 2
        audio = np.frombuffer(pcm16_16k, dtype="<i2", count=n).astype(np.float32) / 32768.0
        features = log_mel_features(audio)[None]
        (out,) = session.run(None, {"input_features": features})
        prob = float(np.asarray(out).reshape(-1)[0])
        self.latencies_ms.append((time.perf_counter() - t0) * 1000)
        del self.latencies_ms[:-256]
        return prob

    async def predict(self, pcm16_16k: bytes) -> float:
        return await asyncio.to_thread(self.predict_sync, pcm16_16k)
