"""How a session's speech leaves the engine when the transport plays it itself (WebRTC).

Without an AudioOutput the engine streams `response.output_audio.delta` events (WebSocket); with
one, PCM goes to the player and the player reports back when playback really starts and stops,
and how much of an item was actually heard (for truncation on barge-in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

OUTPUT_RATE = 24_000  # PCM16 mono, the Realtime API's native rate


@dataclass(slots=True)
class Cleared:
    """What was playing when the output was cleared."""

    response_id: str
    item_id: str
    played_ms: int


class PlaybackListener(Protocol):
    def playback_started(self, response_id: str) -> None: ...

    def playback_stopped(self, response_id: str) -> None:
        """All audio of the response has been played out (not called after `clear`)."""
        ...


@runtime_checkable
class AudioOutput(Protocol):
    listener: PlaybackListener | None

    def play(self, response_id: str, item_id: str, pcm16: bytes) -> None:
        """Queue 24 kHz PCM16 for real-time playback; never blocks."""
        ...

    def finish(self, response_id: str) -> None:
        """No more audio will come for this response; `playback_stopped` follows when drained."""
        ...

    def clear(self) -> Cleared | None:
        """Stop at once and drop everything queued; None if nothing was playing or queued."""
        ...

    def played_ms(self, item_id: str) -> int:
        """Milliseconds of this item's audio actually sent to the peer so far."""
        ...

    @property
    def busy(self) -> bool:
        """True while audio is queued or playing."""
        ...
