"""Text to speech on a remote OpenAI-compatible ``/audio/speech`` endpoint, streamed.

Asks for ``response_format: "pcm"``, which OpenAI defines as raw 24 kHz mono PCM16 little-endian,
and yields the bytes as they arrive (``iter_bytes``), so the first audio plays before the whole
clause is synthesized. The voice list cannot be discovered through the API, so it is configured
(default: OpenAI's built-in voice names); an empty list accepts any voice name as is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from openrealtime.backends.openai_http import RemoteEndpoint, UpstreamFailure
from openrealtime.backends.speech import TTSError, Voice

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
                 "marin", "cedar")
SAMPLE_RATE = 24000
MIN_SPEED = 0.25
MAX_SPEED = 4.0


class OpenAICompatTTS:
    """Implements ``TTSBackend`` with a remote speech endpoint."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str = "tts-1", *,
                 voices: Sequence[str] | None = None, language: str = "en", sample_rate: int = SAMPLE_RATE,
                 timeout: float = 60.0, connect_timeout: float = 5.0, connect_retries: int = 2,
                 headers: dict[str, str] | None = None, name: str | None = None):
        self.model = model
        self.name = name or f"remote-tts:{model}"
        self.sample_rate = sample_rate
        names = OPENAI_VOICES if voices is None else tuple(voices)
        self._voices = [Voice(id=v, name=v, language=language) for v in names]
        self._language = language
        self._endpoint = RemoteEndpoint(base_url, api_key, timeout=timeout, connect_timeout=connect_timeout,
                                        connect_retries=connect_retries, headers=headers, name=self.name)

    def __repr__(self) -> str:
        return f"OpenAICompatTTS(name={self.name!r}, base_url={self._endpoint.base_url!r})"

    def voices(self) -> list[Voice]:
        return list(self._voices)

    def resolve_voice(self, name: str) -> Voice | None:
        if not self._voices:
            return Voice(id=name, name=name, language=self._language) if name else None
        key = name.strip().lower()
        return next((v for v in self._voices if v.id.lower() == key), None)

    async def synthesize(self, text: str, *, voice: str, speed: float = 1.0) -> AsyncIterator[bytes]:
        """24 kHz PCM16 chunks as the server streams them (always whole samples)."""
        if not text.strip():
            return
        body = {"model": self.model, "input": text, "voice": voice, "response_format": "pcm",
                "speed": min(MAX_SPEED, max(MIN_SPEED, float(speed)))}
        carry = b""
        try:
            async with self._endpoint.request("POST", "audio/speech", json=body) as response:
                async for chunk in response.aiter_bytes():
                    chunk = carry + chunk
                    cut = len(chunk) // 2 * 2
                    carry = chunk[cut:]
                    if cut:
                        yield chunk[:cut]
        except UpstreamFailure as exc:
            raise TTSError(str(exc), code=exc.code) from exc

    async def close(self) -> None:
        await self._endpoint.close()
