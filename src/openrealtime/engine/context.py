"""What every session shares: backends (through their protocols only) and server defaults."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..backends.llm import LLMBackend
from ..backends.mcp import McpClient
from ..backends.speech import NoiseSuppressor, STTBackend, TTSBackend, TurnDetector, VADModel
from .ratelimit import RateLimiter
from .stats import EngineStats
from .turns import SPECULATE_AFTER_MS


@dataclass(slots=True)
class SpeechLoad:
    """Transcriptions under way in all sessions, so that optional partial decodes (transcription
    sessions) only use an idle STT and never delay the decodes turns wait for."""

    final: int = 0  # a committed (or speculatively committed) turn's decode
    partial: int = 0  # a transcription session's decode of an utterance still being spoken


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
    # semantic_vad's end-of-turn model and the noise_reduction suppressor (None: not available).
    turn_detector: TurnDetector | None = None
    noise: NoiseSuppressor | None = None
    # Why a session `model` cannot be used (an error message), or None; checked at session.update.
    check_model: Callable[[str | None], str | None] | None = None
    # Requests / tokens per minute per API key, shared by the key's sessions (None: unlimited).
    rate_limiter: RateLimiter | None = None
    # The model that really serves a requested `model` name (None: the name itself).
    effective_model: Callable[[str | None], str] | None = None
    # Whether the model serving a session's `model` reads input_image content (None: none does).
    accepts_images: Callable[[str | None], bool] | None = None
    # Requested voice name (lower case) -> one of the TTS voices; unknown voices use the default
    # voice unless `strict_names`, which makes unknown voices, models and transcription models errors.
    voice_aliases: dict[str, str] = field(default_factory=dict)
    strict_names: bool = False
    # A reply's first piece is spoken after this many words even without punctuation (0: off).
    first_chunk_words: int = 0
    # Cut the TTS's silence before a reply's first word and around a clause cut mid-sentence.
    trim_tts_silence: bool = False
    # Evaluate the next prompt during the silence wait (engine/prefill.py): True, False, or "auto"
    # (server_vad turns only).
    speculative_prefill: bool | str = False
    # The prefill also generates the reply, for the turn's response to adopt (engine/prefill.py).
    speculative_generation: bool = False
    # While the user speaks, the words so far are transcribed every this many ms of new speech and
    # read into the prompt (engine/prefill.py, `start_turn`; 0: only what precedes the words).
    prefill_words_ms: int = 0
    # Quiet (ms) in a turn after which it is transcribed speculatively (engine/turns.py, SilenceBegan).
    speculate_after_ms: int = SPECULATE_AFTER_MS
    # Transcription sessions decode the utterance so far after each this many ms of new speech, to
    # send deltas while the user speaks (0: deltas only once the turn is committed).
    partial_transcript_ms: int = 1000
    stt_load: SpeechLoad = field(default_factory=SpeechLoad)
    # Server-wide counters for GET /metrics (api/metrics.py).
    stats: EngineStats = field(default_factory=EngineStats)
    # Remote MCP servers (`tools` of type "mcp"): the client (None: refused), the hosts a
    # `server_url` may name ("*": any) and the time a listing or a call may take.
    mcp: McpClient | None = None
    mcp_allowed_hosts: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")
    mcp_timeout_s: float = 30.0

    @property
    def audio_output(self) -> bool:
        """Spoken responses need a speech synthesis backend."""
        return self.tts is not None
