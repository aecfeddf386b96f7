"""Protocols for the speech stages: voice activity detection, speech to text, text to speech.

Implementations live one per module (`silero_vad.py`, `whisper_stt.py`, `piper_tts.py`, remote
ones later); the engine sees only these protocols. Every method that does real CPU work is async
and runs off the event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# ---------------------------------------------------------------- VAD


@runtime_checkable
class VADStream(Protocol):
    """Per-session VAD state (recurrent models keep context between frames)."""

    async def process(self, pcm16: bytes) -> list[float]:
        """Feed 16 kHz mono PCM16 of any length; one speech probability per completed frame.

        Leftover samples that do not fill a frame are kept for the next call.
        """
        ...

    def reset(self) -> None: ...


@runtime_checkable
class VADModel(Protocol):
    sample_rate: int  # the rate `process` expects (16000)
    frame_ms: float  # duration of one probability (32 ms for Silero)

    def new_stream(self) -> VADStream: ...


# ---------------------------------------------------------------- STT


@dataclass(slots=True)
class TranscriptDelta:
    text: str


@dataclass(slots=True)
class TranscriptDone:
    text: str
    language: str | None = None
    duration_s: float = 0.0
    # (word, probability) in order, from backends that were asked for them (`word_probabilities`).
    words: list[tuple[str, float]] | None = None


class STTError(Exception):
    """Transcription failed; reported as `conversation.item.input_audio_transcription.failed`."""

    def __init__(self, message: str, code: str = "transcription_failed"):
        super().__init__(message)
        self.code = code


@runtime_checkable
class STTBackend(Protocol):
    name: str
    sample_rate: int  # the rate `transcribe` expects (16000 for Whisper)

    def transcribe(
        self, pcm16: bytes, *, language: str | None = None, prompt: str | None = None
    ) -> AsyncIterator[TranscriptDelta | TranscriptDone]:
        """Deltas as segments are decoded, then exactly one TranscriptDone."""
        ...


# ---------------------------------------------------------------- TTS


@dataclass(slots=True)
class Voice:
    id: str
    name: str
    language: str
    # Other names clients may use for this voice (e.g. OpenAI's built-in voice names).
    aliases: tuple[str, ...] = ()


class TTSError(Exception):
    def __init__(self, message: str, code: str = "tts_failed"):
        super().__init__(message)
        self.code = code


@runtime_checkable
class TTSBackend(Protocol):
    name: str
    sample_rate: int  # rate of the PCM16 chunks `synthesize` yields

    def voices(self) -> list[Voice]: ...

    def resolve_voice(self, name: str) -> Voice | None:
        """The voice for an id or alias; None if this backend has no such voice."""
        ...

    def synthesize(self, text: str, *, voice: str, speed: float = 1.0) -> AsyncIterator[bytes]:
        """Mono PCM16 chunks for `text` (one clause or sentence), first chunk as early as possible.

        Closing the iterator early stops synthesis.
        """
        ...


# ---------------------------------------------------------------- end of turn


@runtime_checkable
class TurnDetector(Protocol):
    """An end-of-turn model for semantic_vad (smart-turn v3 in ``smart_turn.py``)."""

    name: str
    sample_rate: int  # the rate `predict` expects (16000)

    async def predict(self, pcm16_16k: bytes) -> float:
        """P(the speaker has finished their turn) for the turn's audio so far, ending at the pause."""
        ...


# ---------------------------------------------------------------- noise reduction


@runtime_checkable
class NoiseStream(Protocol):
    """Per-session suppressor state (the noise estimate adapts across frames)."""

    async def process(self, pcm16_16k: bytes) -> bytes:
        """Suppressed 16 kHz PCM16 for the input, in order; may hold back less than one frame."""
        ...

    def flush(self) -> bytes:
        """The held-back remainder (unprocessed), leaving the stream empty."""
        ...

    def reset(self) -> None: ...


@runtime_checkable
class NoiseSuppressor(Protocol):
    """Noise reduction for ``audio.input.noise_reduction`` (implementations in ``noise.py``)."""

    name: str
    sample_rate: int  # 16000

    def new_stream(self, kind: str) -> NoiseStream:
        """A stream tuned for ``kind``: "near_field" or "far_field"."""
        ...
