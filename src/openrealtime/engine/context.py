"""What every session shares: backends (through their protocols only) and server defaults."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..backends.llm import LLMBackend
from ..backends.speech import STTBackend, TTSBackend, VADModel


@dataclass(slots=True)
class EngineContext:
    # Resolves a session's `model` to a loaded backend (may load it; never blocks the loop).
    resolve_llm: Callable[[str | None], Awaitable[LLMBackend]]
    default_model: str
    default_instructions: str
    session_ttl_s: int = 3600
    max_event_bytes: int = 15 * 1024 * 1024
    vad: VADModel | None = None
    stt: STTBackend | None = None
    tts: TTSBackend | None = None

    @property
    def audio_output(self) -> bool:
        """Spoken responses need a speech synthesis backend."""
        return self.tts is not None
