"""Speech to text on a remote OpenAI-compatible ``/audio/transcriptions`` endpoint.

The engine's 16 kHz PCM16 is sent as a WAV file (multipart form, ``response_format=json``) with
``model``, ``language`` and ``prompt``; the answer becomes one ``TranscriptDone``. Failures raise
``STTError`` with the codes of ``openai_http.UpstreamFailure`` (upstream_unreachable, upstream_error,
...), which the engine reports as ``conversation.item.input_audio_transcription.failed``.
"""

from __future__ import annotations

import io
import math
import wave
from collections.abc import AsyncIterator
from typing import Any

from openrealtime.backends.openai_http import RemoteEndpoint, UpstreamFailure, malformed_response
from openrealtime.backends.speech import STTError, TranscriptDelta, TranscriptDone
from openrealtime.protocol.errors import ProtocolError
from openrealtime.protocol.limits import loads_limited

SAMPLE_RATE = 16000


def pcm16_to_wav(pcm16: bytes, rate: int) -> bytes:
    """Mono PCM16 as a WAV file."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(rate)
        fh.writeframes(pcm16[: len(pcm16) // 2 * 2])
    return buf.getvalue()


class OpenAICompatSTT:
    """Implements ``STTBackend`` with a remote transcription endpoint."""

    sample_rate = SAMPLE_RATE

    def __init__(self, base_url: str, api_key: str | None = None, model: str = "whisper-1", *,
                 timeout: float = 60.0, connect_timeout: float = 5.0, connect_retries: int = 2,
                 headers: dict[str, str] | None = None, name: str | None = None):
        self.model = model
        self.name = name or f"remote-stt:{model}"
        self._endpoint = RemoteEndpoint(base_url, api_key, timeout=timeout, connect_timeout=connect_timeout,
                                        connect_retries=connect_retries, headers=headers, name=self.name)

    def __repr__(self) -> str:
        return f"OpenAICompatSTT(name={self.name!r}, base_url={self._endpoint.base_url!r})"

    async def transcribe(self, pcm16: bytes, *, language: str | None = None, prompt: str | None = None
                         ) -> AsyncIterator[TranscriptDelta | TranscriptDone]:
        duration = len(pcm16) // 2 / SAMPLE_RATE
        data: dict[str, Any] = {"model": self.model, "response_format": "json"}
        if language:
            data["language"] = language
        if prompt:
            data["prompt"] = prompt
        files = {"file": ("audio.wav", pcm16_to_wav(pcm16, SAMPLE_RATE), "audio/wav")}
        try:
            async with self._endpoint.request("POST", "audio/transcriptions", data=data, files=files) as response:
                raw = await response.aread()
        except UpstreamFailure as exc:
            raise STTError(str(exc), code=exc.code) from exc
        text = raw.decode("utf-8", "replace")
        try:
            body: Any = loads_limited(text)
        except ProtocolError as exc:
            if exc.code == "nesting_too_deep":
                raise self._malformed("the answer nests too deep") from None
            body = text  # a server that ignored response_format=json and sent plain text
        if isinstance(body, dict):
            if not isinstance(body.get("text"), str):
                raise STTError(f"{self.name}: the transcription response has no 'text': {text[:200]}",
                               code="upstream_error")
            lang = body.get("language")
            if lang is not None and not isinstance(lang, str):
                raise self._malformed("'language' is not a string")
            took = body.get("duration")
            if took is not None and (isinstance(took, bool) or not isinstance(took, (int, float))
                                     or not math.isfinite(took) or took < 0):
                raise self._malformed(f"'duration' is {took!r:.50}, not a number of seconds")
            yield TranscriptDone(text=body["text"].strip(), language=lang or language,
                                 duration_s=float(took or duration))
        else:
            yield TranscriptDone(text=str(body).strip(), language=language, duration_s=duration)

    def _malformed(self, problem: str) -> STTError:
        failure = malformed_response(self.name, problem)
        return STTError(str(failure), code=failure.code)

    async def close(self) -> None:
        await self._endpoint.close()
