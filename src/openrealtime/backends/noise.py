"""Noise suppression of caller audio before VAD and STT (``audio.input.noise_reduction``).

Two implementations of the ``NoiseSuppressor`` protocol, both native code shipped in PyPI wheels:

- ``WebRtcNoiseSuppressor`` (``webrtc-noise-gain``, Apache-2.0 wrapper of WebRTC's audio
  processing module): the classic spectral noise suppressor plus high-pass filter and optional
  automatic gain control, on 10 ms frames of 16 kHz audio.
- ``RNNoiseSuppressor`` (``pyrnnoise``, Apache-2.0; RNNoise itself is BSD-3): a small recurrent
  network on 10 ms frames of 48 kHz audio, so 16 kHz input is resampled up and back down.
  Only the bundled ``librnnoise.so`` is used, through ctypes: ``pyrnnoise``'s Python layer imports
  matplotlib and audiolab, which we do not need (``pip install --no-deps pyrnnoise`` suffices).

Each session gets its own stream (both suppressors keep state across frames). A stream holds back
less than one 10 ms frame (RNNoise's output content also lags by its 20 ms look-ahead), and
``flush()`` returns the held-back rest unprocessed.

Per-type settings (chosen with bench/noise_reduction.py): ``near_field`` (a headset or a phone held
close: speech dominates) suppresses gently, ``far_field`` (a laptop or room microphone: more noise)
suppresses harder. Stronger settings than these cost words (Whisper) or create "musical noise"
artifacts that Silero VAD takes for speech, and automatic gain control is left off: Silero and
Whisper are insensitive to level, and AGC only raised false speech_started on noise in our
measurements. (What keeps background *talkers* from starting turns is not here: see
``engine/gate.py``.)
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.util
import logging
import threading
from pathlib import Path
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
FRAME_10MS = 160  # samples per 10 ms at 16 kHz
# Chunks up to this many 10 ms frames are processed inline on the event loop (< ~1 ms);
# larger ones (a client sending seconds of audio at once) go to a worker thread.
_INLINE_FRAMES = 24

NoiseKind = Literal["near_field", "far_field"]


def _package_dir(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


class _FramedStream:
    """Common plumbing: byte leftovers, whole-frame batching, inline-or-thread dispatch, ordering."""

    frame_samples = FRAME_10MS

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._generation = 0
        self._pending = b""

    def _process_frames(self, pcm16: bytes) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError

    def _reset_state(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def reset(self) -> None:
        self._generation += 1
        self._pending = b""
        self._reset_state()

    def process_sync(self, pcm16: bytes) -> bytes:
        """Blocking variant of ``process`` (benchmarks, tests)."""
        data = self._pending + pcm16
        frame_bytes = self.frame_samples * 2
        usable = len(data) - len(data) % frame_bytes
        self._pending = data[usable:]
        return self._process_frames(data[:usable]) if usable else b""

    async def process(self, pcm16: bytes) -> bytes:
        data = self._pending + pcm16
        frame_bytes = self.frame_samples * 2
        usable = len(data) - len(data) % frame_bytes
        self._pending = data[usable:]
        if not usable:
            return b""
        chunk = data[:usable]
        generation = self._generation
        async with self._lock:  # keeps the suppressor's state chained when calls overlap
            if generation != self._generation:
                return b""
            if usable // frame_bytes <= _INLINE_FRAMES:
                return self._process_frames(chunk)
            out = await asyncio.to_thread(self._process_frames, chunk)
            return out if generation == self._generation else b""

    def flush(self) -> bytes:
        """The held-back tail (less than one frame), passed through unprocessed."""
        tail, self._pending = self._pending, b""
        return tail


# ---------------------------------------------------------------- WebRTC

# (auto_gain target in dBFS below full scale, 0 = off; noise suppression level 0-4: 0 off, 1 low,
# 2 moderate, 3 high, 4 very high). Levels 2+ leave "musical noise" in loud white noise that Silero
# sometimes takes for speech (bench/noise_reduction.py); AGC only added false turns.
WEBRTC_SETTINGS: dict[str, tuple[int, int]] = {
    "near_field": (0, 1),
    "far_field": (0, 2),
}


class WebRtcNoiseStream(_FramedStream):
    def __init__(self, auto_gain: int, level: int):
        super().__init__()
        self._auto_gain = auto_gain
        self._level = level
        self._reset_state()

    def _reset_state(self) -> None:
        from webrtc_noise_gain import AudioProcessor

        self._proc = AudioProcessor(self._auto_gain, self._level)

    def _process_frames(self, pcm16: bytes) -> bytes:
        step = FRAME_10MS * 2
        process = self._proc.Process10ms
        return b"".join(process(pcm16[i:i + step]).audio for i in range(0, len(pcm16), step))


class WebRtcNoiseSuppressor:
    """Implements ``NoiseSuppressor`` with WebRTC's noise suppression (and high-pass filter)."""

    name = "webrtc-ns"
    sample_rate = SAMPLE_RATE

    def __init__(self, settings: dict[str, tuple[int, int]] | None = None):
        if _package_dir("webrtc_noise_gain") is None:
            raise RuntimeError("webrtc-noise-gain is not installed")
        self.settings = {**WEBRTC_SETTINGS, **(settings or {})}

    def new_stream(self, kind: NoiseKind) -> WebRtcNoiseStream:
        auto_gain, level = self.settings[kind]
        return WebRtcNoiseStream(auto_gain, level)


# ---------------------------------------------------------------- RNNoise

RNNOISE_RATE = 48_000
RNNOISE_FRAME = 480  # 10 ms at 48 kHz
RNNOISE_DELAY = 960  # samples (48 kHz) by which RNNoise's output lags its input (measured)
# Fraction of the original signal mixed back in, time-aligned: an attenuation limit (0.65 caps
# suppression at ~4 dB, 0.5 at ~6 dB). Without a floor RNNoise also removes much of the wanted
# voice when the noise is other voices (babble), and its residual in loud white noise "burbles" so
# that Silero starts false turns (none with a floor of 0.2 or more). Measured with Whisper tiny.en on
# 20 noisy utterances per condition (white / babble at 10 / 5 dB SNR) and two noise draws
# (bench/noise_reduction.py; one condition's WER moves +-0.03 between draws): mean WER over the 8
# conditions 0.137 without suppression, 0.115 at 0.65, 0.126 at 0.5, and 0.3 gave 0.379 against
# 0.275 in babble at 5 dB. near_field 0.65 was at or below no suppression in 7 of 8 conditions;
# far_field (more room noise) takes 0.5, for more suppression of stationary noise (SI-SDR) at the
# same word error rate.
RNNOISE_DRY_MIX: dict[str, float] = {"near_field": 0.65, "far_field": 0.5}

_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def rnnoise_library_path() -> Path | None:
    base = _package_dir("pyrnnoise")
    if base is None:
        return None
    path = base / "librnnoise.so"
    return path if path.is_file() else None


def _rnnoise() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        with _lib_lock:
            if _lib is None:
                path = rnnoise_library_path()
                if path is None:
                    raise RuntimeError("pyrnnoise (librnnoise.so) is not installed")
                lib = ctypes.CDLL(str(path))
                lib.rnnoise_create.argtypes = [ctypes.c_void_p]
                lib.rnnoise_create.restype = ctypes.c_void_p
                lib.rnnoise_destroy.argtypes = [ctypes.c_void_p]
                lib.rnnoise_destroy.restype = None
                lib.rnnoise_process_frame.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_float),
                                                      ctypes.POINTER(ctypes.c_float)]
                lib.rnnoise_process_frame.restype = ctypes.c_float
                lib.rnnoise_get_frame_size.restype = ctypes.c_int
                if lib.rnnoise_get_frame_size() != RNNOISE_FRAME:
                    raise RuntimeError("unexpected RNNoise frame size")
                _lib = lib
    return _lib


def _lowpass_taps(n_taps: int = 97, cutoff_hz: float = 7600.0, rate: int = RNNOISE_RATE) -> np.ndarray:
    """Linear-phase windowed-sinc (Kaiser) low-pass at 48 kHz, unity gain at DC."""
    t = np.arange(n_taps) - (n_taps - 1) / 2
    taps = np.sinc(2 * cutoff_hz / rate * t) * np.kaiser(n_taps, 8.0)
    return (taps / taps.sum()).astype(np.float32)


_TAPS = _lowpass_taps()


class _Fir:
    """A streaming FIR filter (keeps the last len(taps) - 1 inputs between calls)."""

    def __init__(self, taps: np.ndarray):
        self.taps = taps
        self.hist = np.zeros(taps.size - 1, np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        buf = np.concatenate((self.hist, x))
        self.hist = buf[buf.size - self.hist.size:].copy()
        return np.convolve(buf, self.taps, mode="valid").astype(np.float32)


class RNNoiseStream(_FramedStream):
    """16 kHz in and out; RNNoise at 48 kHz in between.

    The 1:3 rate change is exact (zero-stuffing / decimation around a 97-tap low-pass), so every
    10 ms frame of input is one RNNoise frame and the output has exactly the input's length; the
    content lags by RNNoise's 20 ms look-ahead plus 2 ms of filter delay.
    """

    def __init__(self, dry_mix: float):
        super().__init__()
        self._dry = dry_mix
        self._state: int | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        lib = _rnnoise()
        if self._state is not None:
            lib.rnnoise_destroy(self._state)
        self._state = lib.rnnoise_create(None)
        self._up = _Fir(_TAPS * 3.0)  # zero-stuffing divides the level by 3
        self._down = _Fir(_TAPS)
        # The dry signal, delayed to line up with RNNoise's output (it lags its input by 20 ms).
        self._dry_hist = np.zeros(RNNOISE_DELAY, np.float32)

    def _process_frames(self, pcm16: bytes) -> bytes:
        lib = _rnnoise()
        x = np.frombuffer(pcm16, dtype="<i2").astype(np.float32)  # RNNoise works in int16 scale
        stuffed = np.zeros(x.size * 3, np.float32)
        stuffed[::3] = x
        frames = self._up(stuffed)  # whole 480-sample frames: the input is whole 10 ms frames
        out = np.empty_like(frames)
        ptr_t = ctypes.POINTER(ctypes.c_float)
        for i in range(0, frames.size, RNNOISE_FRAME):
            seg_in, seg_out = frames[i:i + RNNOISE_FRAME], out[i:i + RNNOISE_FRAME]
            lib.rnnoise_process_frame(self._state, seg_out.ctypes.data_as(ptr_t), seg_in.ctypes.data_as(ptr_t))
        if self._dry:
            delayed = np.concatenate((self._dry_hist, frames))
            self._dry_hist = delayed[delayed.size - RNNOISE_DELAY:].copy()
            out = out * (1.0 - self._dry) + delayed[: frames.size] * self._dry
        low = self._down(out)[::3]
        return np.clip(np.round(low), -32768, 32767).astype("<i2").tobytes()

    def __del__(self) -> None:
        if self._state is not None and _lib is not None:
            _lib.rnnoise_destroy(self._state)
            self._state = None


class RNNoiseSuppressor:
    """Implements ``NoiseSuppressor`` with RNNoise (resampled 16 -> 48 -> 16 kHz)."""

    name = "rnnoise"
    sample_rate = SAMPLE_RATE

    def __init__(self, dry_mix: dict[str, float] | None = None):
        if rnnoise_library_path() is None:
            raise RuntimeError("pyrnnoise is not installed")
        self.dry_mix = {**RNNOISE_DRY_MIX, **(dry_mix or {})}

    def new_stream(self, kind: NoiseKind) -> RNNoiseStream:
        return RNNoiseStream(self.dry_mix[kind])


SUPPRESSORS = {"webrtc": WebRtcNoiseSuppressor, "rnnoise": RNNoiseSuppressor}
