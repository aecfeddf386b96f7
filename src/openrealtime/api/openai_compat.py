"""The OpenAI audio surface on top of our own backends, so other tools can use our models.

- ``POST /v1/chat/completions``: any model the session ``model`` field accepts (local models,
  ``<provider>/<model>``), streaming (SSE) or not, with tools mapped through the LLM protocol.
- ``POST /v1/audio/transcriptions``: the server's STT stage; WAV/raw PCM read directly, other
  formats (mp3, ogg/opus, webm, flac, m4a) decoded with PyAV.
- ``POST /v1/audio/speech``: the server's TTS stage, streamed as it is synthesized, in pcm (24 kHz
  PCM16, as OpenAI), wav, mp3, opus, aac or flac; ``stream_format: "sse"`` too.

Errors use the OpenAI error shape; a stage this server does not have answers 503.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..audio.resample import StreamResampler
from ..audio.transcode import SPEECH_FORMATS, AudioDecodeError, StreamEncoder, decode_audio
from ..backends.llm import (
    ChatMessage,
    Finished,
    GenerationParams,
    LLMBackend,
    LLMError,
    LLMEvent,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    Usage,
)
from ..backends.openai_llm import OpenAICompatLLM
from ..backends.speech import STTError, TranscriptDone, TTSError
from ..engine.clauses import speakable
from .auth import require_key
from .errors import APIError, LimitedJSONRoute

log = logging.getLogger(__name__)

# LimitedJSONRoute: pydantic bodies are parsed with a nesting limit (see api/errors.py).
router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)], route_class=LimitedJSONRoute)

# OpenAI's limits.
MAX_UPLOAD_BYTES = 25 * 1024 * 1024
MAX_SPEECH_INPUT = 4096
SPEECH_RATE = 24000  # pcm/wav output rate, as OpenAI's `pcm`

# ------------------------------------------------------------------ errors

_LLM_STATUS = {
    "model_not_found": (404, "invalid_request_error", "model"),
    "model_not_allowed": (403, "invalid_request_error", "model"),
    "context_length_exceeded": (400, "invalid_request_error", "messages"),
    "chat_template_error": (400, "invalid_request_error", "messages"),
    "model_closed": (503, "server_error", None),
    "upstream_rate_limited": (429, "rate_limit_error", None),
    "upstream_timeout": (504, "server_error", None),
    "invalid_tool_choice": (400, "invalid_request_error", "tool_choice"),
}
# Speech-stage failures the request caused (a language or voice the model does not have).
_SPEECH_CLIENT_ERRORS = {"unsupported_language": "language", "unknown_voice": "voice"}


def _llm_api_error(exc: LLMError) -> APIError:
    status, kind, param = _LLM_STATUS.get(exc.code, (502 if exc.code.startswith("upstream_") else 500,
                                                      "server_error", None))
    return APIError(status, str(exc), type=kind, code=exc.code, param=param)


def _speech_api_error(exc: STTError | TTSError) -> APIError:
    if exc.code in _SPEECH_CLIENT_ERRORS:
        return APIError(400, str(exc), code=exc.code, param=_SPEECH_CLIENT_ERRORS[exc.code])
    if exc.code == "upstream_timeout":
        return APIError(504, str(exc), type="server_error", code=exc.code)
    if exc.code == "upstream_rate_limited":
        return APIError(429, str(exc), type="rate_limit_error", code=exc.code)
    status = 502 if exc.code.startswith("upstream_") else 500
    return APIError(status, str(exc), type="server_error", code=exc.code)


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


# ------------------------------------------------------------------ chat completions


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI parameters are accepted and ignored

    model: str = ""
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI's
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


def _content_text(content: Any, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text", "output_text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(400, f"Content parts of type '{kind}' are not supported; only text is.",
                               code="unsupported_content", param=f"{param}[{i}]")
            texts.append(str(part.get("text") or ""))
        return "".join(texts)
    raise APIError(400, "Message content must be a string or a list of text parts.", code="invalid_value",
                   param=param)


def _to_messages(raw: list[dict[str, Any]]) -> list[ChatMessage]:
    out = []
    for i, m in enumerate(raw):
        role = m.get("role")
        param = f"messages[{i}]"
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"Invalid role {role!r}: expected system, developer, user, assistant or tool.",
                           code="invalid_value", param=f"{param}.role")
        content = _content_text(m.get("content"), f"{param}.content")
        calls = None
        if role == "assistant" and m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list):
                raise APIError(400, "tool_calls must be a list of tool calls.", code="invalid_type",
                               param=f"{param}.tool_calls")
            calls = []
            for j, call in enumerate(m["tool_calls"]):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not fn.get("name"):
                    raise APIError(400, "A tool call needs function.name.", code="invalid_value",
                                   param=f"{param}.tool_calls[{j}].function.name")
                args = fn.get("arguments") or ""
                calls.append(ToolCall(id=str(call.get("id") or f"call_{j}"), name=str(fn["name"]),
                                      arguments=args if isinstance(args, str) else json.dumps(args)))
        tool_call_id = None
        if role == "tool":
            tool_call_id = m.get("tool_call_id")
            if not isinstance(tool_call_id, str) or not tool_call_id:
                raise APIError(400, "A tool message needs tool_call_id.", code="missing_required_parameter",
                               param=f"{param}.tool_call_id")
        out.append(ChatMessage(role=role, content=content, tool_calls=calls, tool_call_id=tool_call_id))
    return out


def _tools(req: ChatCompletionRequest) -> tuple[list[ToolSpec], str]:
    specs = []
    for i, tool in enumerate(req.tools or []):
        fn = tool.get("function")
        if tool.get("type") != "function" or not isinstance(fn, dict) or not fn.get("name"):
            raise APIError(400, "Only function tools with a name are supported.", code="invalid_value",
                           param=f"tools[{i}]")
        description, parameters = fn.get("description"), fn.get("parameters")
        if description is not None and not isinstance(description, str):
            raise APIError(400, "A tool's description must be a string.", code="invalid_type",
                           param=f"tools[{i}].function.description")
        if parameters is not None and not isinstance(parameters, dict):
            raise APIError(400, "A tool's parameters must be a JSON Schema object.", code="invalid_type",
                           param=f"tools[{i}].function.parameters")
        specs.append(ToolSpec(name=str(fn["name"]), description=description, parameters=parameters))
    choice = req.tool_choice
    if choice is None:
        name = "auto"
    elif isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise APIError(400, f"Invalid tool_choice {choice!r}.", code="invalid_value", param="tool_choice")
        name = choice
    else:
        fn = choice.get("function")
        name = str(fn.get("name") or "") if isinstance(fn, dict) else ""
        if not name:
            raise APIError(400, "tool_choice needs function.name.", code="invalid_value",
                           param="tool_choice.function.name")
    if name == "required" and not specs:
        raise APIError(400, "tool_choice 'required' needs tools.", code="invalid_value", param="tool_choice")
    if name not in ("auto", "none", "required") and not any(s.name == name for s in specs):
        raise APIError(400, f"tool_choice {name!r} does not name one of the tools.", code="invalid_value",
                       param="tool_choice")
    return specs, name


class _StopFilter:
    """Cuts streamed text at the first stop sequence, holding back what could be its beginning."""

    def __init__(self, stop: str | list[str] | None):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""
        self.hit = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        self.buf += text
        found = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.buf, self.hit = self.buf[:min(found)], "", True
            return out
        cut = max(0, len(self.buf) - self.hold)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


def _usage_json(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


async def _events(backend: LLMBackend, messages: list[ChatMessage], params: GenerationParams,
                  stops: _StopFilter) -> AsyncIterator[LLMEvent]:
    """The backend's events with stop sequences applied; always ends with one Finished."""
    deltas = 0
    async with contextlib.aclosing(backend.stream(messages, params)) as stream:
        async for event in stream:
            if isinstance(event, TextDelta):
                deltas += 1
                text = stops.push(event.text)
                if text:
                    yield TextDelta(text)
                if stops.hit:
                    break
            elif isinstance(event, Finished):
                tail = stops.flush()
                if tail:
                    yield TextDelta(tail)
                yield event
                return
            else:
                yield event
    # Stopped at a stop sequence: generation was abandoned, so estimate what the backend used.
    prompt = await backend.count_tokens(messages)
    yield Finished(finish_reason="stop", usage=Usage(prompt_tokens=prompt, completion_tokens=deltas))


@router.post("/chat/completions")
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
    if body.n not in (None, 1):
        raise APIError(400, "Only n=1 is supported.", code="unsupported_value", param="n")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise APIError(400, "Only response_format {'type': 'text'} is supported.", code="unsupported_value",
                       param="response_format")
    messages = _to_messages(body.messages)
    tools, tool_choice = _tools(body)
    try:
        backend = await request.app.state.llm.resolve(body.model or None)
    except LLMError as exc:
        raise _llm_api_error(exc) from None
    seed = body.seed
    if seed is not None and seed < 0 and not isinstance(backend, OpenAICompatLLM):
        seed += 2**64  # the local sampler's numpy generator takes only non-negative seeds
    defaults = GenerationParams()
    params = GenerationParams(
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        seed=seed, tools=tools, tool_choice=tool_choice,
    )
    completion_id = "chatcmpl-" + secrets.token_hex(12)
    created = int(time.time())
    model = body.model or getattr(backend, "name", "")
    events = _events(backend, messages, params, _StopFilter(body.stop))
    try:
        first = await anext(events)
    except LLMError as exc:
        await events.aclose()
        raise _llm_api_error(exc) from None
    except BaseException:
        await events.aclose()
        raise

    if not body.stream:
        try:
            return await _collect(first, events, completion_id, created, model)
        except LLMError as exc:
            raise _llm_api_error(exc) from None
        finally:
            await events.aclose()
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    return StreamingResponse(_stream(first, events, completion_id, created, model, include_usage),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _collect(first: LLMEvent, events: AsyncIterator[LLMEvent], completion_id: str, created: int,
                   model: str) -> dict[str, Any]:
    text: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finished: Finished | None = None
    event: LLMEvent | None = first
    while event is not None:
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, ToolCallDelta):
            call = calls.setdefault(event.index, {"id": event.call_id or f"call_{secrets.token_hex(12)}",
                                                  "type": "function", "function": {"name": "", "arguments": ""}})
            if event.name:
                call["function"]["name"] = event.name
            call["function"]["arguments"] += event.arguments
        elif isinstance(event, Finished):
            finished = event
            break
        event = await anext(events, None)
    finished = finished or Finished(finish_reason="stop")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None,
                               "refusal": None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finished.finish_reason, "logprobs": None}],
        "usage": _usage_json(finished.usage),
    }


async def _stream(first: LLMEvent, events: AsyncIterator[LLMEvent], completion_id: str, created: int,
                  model: str, include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        data: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                             "finish_reason": finish}]}
        if include_usage:
            data["usage"] = None
        return _sse(data)

    try:
        yield chunk({"role": "assistant", "content": ""})
        event: LLMEvent | None = first
        while event is not None:
            if isinstance(event, TextDelta):
                if event.text:
                    yield chunk({"content": event.text})
            elif isinstance(event, ToolCallDelta):
                call: dict[str, Any] = {"index": event.index, "function": {"arguments": event.arguments}}
                if event.call_id is not None or event.name is not None:
                    call.update(id=event.call_id or f"call_{secrets.token_hex(12)}", type="function")
                    call["function"]["name"] = event.name or ""
                yield chunk({"tool_calls": [call]})
            elif isinstance(event, Finished):
                yield chunk({}, event.finish_reason)
                if include_usage:
                    yield _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                "model": model, "choices": [], "usage": _usage_json(event.usage)})
                break
            event = await anext(events, None)
        yield b"data: [DONE]\n\n"
    except LLMError as exc:
        # Headers are sent: report the failure in the stream, the way OpenAI does.
        log.warning("chat completion %s failed mid-stream: %s", completion_id, exc)
        yield _sse({"error": {"message": str(exc), "type": "server_error", "code": exc.code, "param": None}})
    finally:
        await events.aclose()


# ------------------------------------------------------------------ transcriptions


@router.post("/audio/transcriptions")
async def transcriptions(
    request: Request,
    file: UploadFile = File(...),
    model: str = Form("whisper-1"),
    language: str | None = Form(None),
    prompt: str | None = Form(None),
    response_format: str = Form("json"),
    temperature: float | None = Form(None),
) -> Any:
    stt = request.app.state.speech.stt
    if stt is None:
        raise APIError(503, "Speech to text is not available on this server.", type="server_error",
                       code="stt_unavailable")
    if response_format not in ("json", "text", "verbose_json", "srt", "vtt"):
        raise APIError(400, f"Unsupported response_format {response_format!r}: use json, text, verbose_json, "
                       "srt or vtt.", code="unsupported_value", param="response_format")
    data = await file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise APIError(413, f"The audio file is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB.",
                       code="file_too_large", param="file")
    max_s = request.app.state.settings.transcription_max_duration_s
    try:
        pcm = await asyncio.to_thread(decode_audio, data, file.filename, rate=stt.sample_rate,
                                      max_duration_s=max_s)
    except AudioDecodeError as exc:
        raise APIError(400, str(exc), code=exc.code, param="file") from None
    duration = len(pcm) / 2 / stt.sample_rate
    done: TranscriptDone | None = None
    try:
        async with contextlib.aclosing(stt.transcribe(pcm, language=language or None,
                                                      prompt=prompt or None)) as stream:
            async for event in stream:
                if isinstance(event, TranscriptDone):
                    done = event
    except STTError as exc:
        raise _speech_api_error(exc) from None
    text = done.text.strip() if done else ""
    lang = (done.language if done else None) or language or "en"
    if response_format == "text":
        return PlainTextResponse(text + "\n")
    if response_format in ("srt", "vtt"):
        return PlainTextResponse(_subtitles(text, duration, response_format))
    if response_format == "verbose_json":
        return {"task": "transcribe", "language": lang, "duration": round(duration, 3), "text": text,
                "segments": [], "usage": {"type": "duration", "seconds": math.ceil(duration)}}
    return {"text": text, "usage": {"type": "duration", "seconds": math.ceil(duration)}}


def _subtitles(text: str, duration: float, fmt: str) -> str:
    def stamp(t: float) -> str:
        ms = round(t * 1000)
        h, rem = divmod(ms, 3_600_000)
        m, rem = divmod(rem, 60_000)
        s, ms = divmod(rem, 1000)
        sep = "," if fmt == "srt" else "."
        return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"

    cue = f"{stamp(0)} --> {stamp(duration)}\n{text}\n"
    return f"1\n{cue}\n" if fmt == "srt" else f"WEBVTT\n\n{cue}\n"


# ------------------------------------------------------------------ speech


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = "tts-1"
    input: str = Field(min_length=1, max_length=MAX_SPEECH_INPUT)
    voice: str | dict[str, Any]
    speed: float = Field(1.0, ge=0.25, le=4.0)
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    stream_format: Literal["audio", "sse"] = "audio"
    instructions: str | None = None


@router.post("/audio/speech")
async def speech(request: Request, body: SpeechRequest) -> Any:
    tts = request.app.state.speech.tts
    if tts is None:
        raise APIError(503, "Text to speech is not available on this server.", type="server_error",
                       code="tts_unavailable")
    voice_name = body.voice if isinstance(body.voice, str) else str(body.voice.get("id") or "")
    voice = tts.resolve_voice(voice_name)
    if voice is None:
        names = ", ".join(v.id for v in tts.voices())
        raise APIError(400, f"Unknown voice '{voice_name}'. Available voices: {names} (see GET /v1/voices).",
                       code="invalid_value", param="voice")
    text = speakable(body.input)
    if not text:
        raise APIError(400, "The input has nothing to say.", code="invalid_value", param="input")
    pcm = _speech_pcm(tts, text, voice.id, body.speed)
    try:
        first = await anext(pcm)
    except (TTSError, StopAsyncIteration) as exc:
        await pcm.aclose()
        if isinstance(exc, TTSError):
            raise _speech_api_error(exc) from None
        first = b""
    except BaseException:
        await pcm.aclose()
        raise
    if body.stream_format == "sse":
        return StreamingResponse(_speech_sse(first, pcm, body.response_format), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return StreamingResponse(_speech_audio(first, pcm, body.response_format),
                             media_type=SPEECH_FORMATS[body.response_format],
                             headers={"Cache-Control": "no-cache"})


async def _speech_pcm(tts: Any, text: str, voice: str, speed: float) -> AsyncIterator[bytes]:
    """24 kHz PCM16 chunks of the speech, resampled from the TTS backend's rate."""
    resampler = StreamResampler(tts.sample_rate, SPEECH_RATE)
    async with contextlib.aclosing(tts.synthesize(text, voice=voice, speed=speed)) as chunks:
        async for chunk in chunks:
            out = resampler.process(chunk)
            if out:
                yield out
    tail = resampler.flush()
    if tail:
        yield tail


async def _encoded(first: bytes, pcm: AsyncIterator[bytes], fmt: str) -> AsyncIterator[bytes]:
    encoder = StreamEncoder(fmt, SPEECH_RATE)
    try:
        chunk: bytes | None = first
        while chunk is not None:
            out = encoder.encode(chunk)
            if out:
                yield out
            chunk = await anext(pcm, None)
        out = encoder.finish()
        if out:
            yield out
    finally:
        encoder.close()
        await pcm.aclose()


async def _speech_audio(first: bytes, pcm: AsyncIterator[bytes], fmt: str) -> AsyncIterator[bytes]:
    try:
        async for out in _encoded(first, pcm, fmt):
            yield out
    except TTSError as exc:  # headers are sent: the audio just ends early
        log.warning("speech synthesis failed mid-stream: %s", exc)


async def _speech_sse(first: bytes, pcm: AsyncIterator[bytes], fmt: str) -> AsyncIterator[bytes]:
    try:
        async for out in _encoded(first, pcm, fmt):
            yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(out).decode()})
        yield _sse({"type": "speech.audio.done",
                    "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}})
    except TTSError as exc:
        log.warning("speech synthesis failed mid-stream: %s", exc)
        yield _sse({"type": "error", "error": {"message": str(exc), "type": "server_error", "code": exc.code}})

