"""OpenAICompatLLM's protocol mapping and failure codes against scripted upstream answers
(httpx.MockTransport), plus provider routing in the registry and the speech stages."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from openrealtime.audio.transcode import StreamEncoder, decode_audio
from openrealtime.backends.llm import (
    ChatMessage,
    Finished,
    GenerationParams,
    LLMError,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
)
from openrealtime.backends.openai_llm import OpenAICompatLLM
from openrealtime.backends.openai_stt import OpenAICompatSTT
from openrealtime.backends.openai_tts import OpenAICompatTTS
from openrealtime.backends.registry import LLMRegistry
from openrealtime.backends.speech_registry import load_speech_backends
from openrealtime.config import ProviderConfig, Settings


def sse(*chunks: Any, done: bool = True) -> bytes:
    out = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks)
    return out + (b"data: [DONE]\n\n" if done else b"")


def delta(content: str | None = None, finish: str | None = None, tool_calls: list | None = None) -> dict:
    d: dict[str, Any] = {}
    if content is not None:
        d["content"] = content
    if tool_calls is not None:
        d["tool_calls"] = tool_calls
    return {"choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


class _Broken(httpx.AsyncByteStream):
    """A body that delivers some bytes, then the connection drops."""

    def __init__(self, first: bytes):
        self.first = first

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.first
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


def backend(handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any) -> OpenAICompatLLM:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return OpenAICompatLLM("http://upstream.test/v1", "sk-up", "m", client=client, retry_backoff_s=0.01,
                           **kwargs)


async def run(llm: OpenAICompatLLM, messages: list[ChatMessage] | None = None,
              params: GenerationParams | None = None) -> list[Any]:
    return [e async for e in llm.stream(messages or [ChatMessage("user", "hi")], params or GenerationParams())]


async def test_request_body_maps_messages_tools_and_params():
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/chat/completions"
        assert request.headers["authorization"] == "Bearer sk-up"
        seen.append(json.loads(request.content))
        usage = {"prompt_tokens": 7, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 3}}
        return httpx.Response(200, content=sse(delta("ok"), delta(finish="stop"), {"choices": [], "usage": usage}))

    llm = backend(handler)
    messages = [ChatMessage("system", "be nice"), ChatMessage("user", "weather?"),
                ChatMessage("assistant", "", tool_calls=[ToolCall("call_1", "get_weather", '{"city":"Paris"}')]),
                ChatMessage("tool", "sunny", tool_call_id="call_1")]
    params = GenerationParams(temperature=0.2, max_tokens=5, seed=1, tools=[ToolSpec("get_weather", "w", None)],
                              tool_choice="get_weather")
    events = await run(llm, messages, params)
    body = seen[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "m" and body["temperature"] == 0.2 and body["max_tokens"] == 5 and body["seed"] == 1
    assert "top_k" not in body
    assert body["messages"][2] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}
    assert body["messages"][3] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    assert body["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "w", "parameters": {"type": "object", "properties": {}}}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert events[0] == TextDelta("ok")
    assert events[-1].finish_reason == "stop"
    assert (events[-1].usage.prompt_tokens, events[-1].usage.completion_tokens, events[-1].usage.cached_tokens) == (
        7, 1, 3)
    assert "tools" not in llm.request_body(messages, GenerationParams())
    await llm.close()


async def test_tool_call_deltas_are_normalized():
    chunks = [
        # A server that repeats id and name on every delta and leaves out `index`.
        delta(tool_calls=[{"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x":'}}]),
        delta(tool_calls=[{"id": "a", "type": "function", "function": {"name": "f", "arguments": "1}"}}]),
        # A second call reusing index 0 with a new id; arguments sent as an object.
        delta(tool_calls=[{"index": 0, "id": "b", "function": {"name": "g", "arguments": {"y": 2}}}]),
        delta(finish="stop"),  # some servers say "stop" after tool calls
    ]
    llm = backend(lambda r: httpx.Response(200, content=sse(*chunks)))
    events = await run(llm)
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert calls == [ToolCallDelta(0, '{"x":', "a", "f"), ToolCallDelta(0, "1}"),
                     ToolCallDelta(1, '{"y": 2}', "b", "g")]
    assert events[-1] == Finished("tool_calls", events[-1].usage)
    await llm.close()


async def test_usage_is_estimated_without_a_usage_chunk():
    llm = backend(lambda r: httpx.Response(200, content=sse(delta("a"), delta("b"), delta(finish="length"))))
    events = await run(llm, [ChatMessage("user", "x" * 40)])
    assert events[-1].finish_reason == "length"
    assert events[-1].usage.completion_tokens == 2 and events[-1].usage.prompt_tokens >= 10
    await llm.close()


@pytest.mark.parametrize(("status", "body", "code"), [
    (500, {"error": {"message": "model crashed", "type": "server_error"}}, "upstream_error"),
    (503, "Service Unavailable", "upstream_error"),
    (429, {"error": {"message": "slow down", "code": "rate_limit_exceeded"}}, "upstream_rate_limited"),
    (401, {"error": {"message": "bad key"}}, "upstream_auth_failed"),
    (400, {"error": {"message": "This model's maximum context length is 8192 tokens",
                     "code": "context_length_exceeded"}}, "context_length_exceeded"),
    (404, {"detail": "Not Found"}, "upstream_error"),
])
async def test_http_errors(status: int, body: Any, code: str):
    content = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
    headers = {"retry-after": "3"} if status == 429 else {}
    llm = backend(lambda r: httpx.Response(status, content=content, headers=headers))
    with pytest.raises(LLMError) as info:
        await run(llm)
    err = info.value
    assert err.code == code
    assert f"HTTP {status}" in str(err) and err.details["status"] == status
    message = body if isinstance(body, str) else (body.get("error") or {}).get("message") or body.get("detail")
    assert message in str(err)
    if status == 429:
        assert err.details["retry_after"] == "3"
    await llm.close()


async def test_error_inside_the_stream():
    llm = backend(lambda r: httpx.Response(200, content=sse(delta("Hel"), {"error": {"message": "out of memory"}})))
    stream = llm.stream([ChatMessage("user", "hi")], GenerationParams())
    assert await anext(stream) == TextDelta("Hel")
    with pytest.raises(LLMError) as info:
        await anext(stream)
    assert info.value.code == "upstream_error" and "out of memory" in str(info.value)
    await llm.close()


async def test_disconnects_mid_stream():
    cut = backend(lambda r: httpx.Response(200, stream=_Broken(sse(delta("Hel"), done=False))))
    with pytest.raises(LLMError) as info:
        await run(cut)
    assert info.value.code == "upstream_disconnected"
    # A body that just ends (no [DONE], no finish_reason) is a disconnect too.
    ended = backend(lambda r: httpx.Response(200, content=sse(delta("Hel"), done=False)))
    with pytest.raises(LLMError) as info:
        await run(ended)
    assert info.value.code == "upstream_disconnected"
    await cut.close()
    await ended.close()


async def test_timeout_and_connect_retries():
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    llm = backend(slow, timeout=1.5)
    with pytest.raises(LLMError) as info:
        await run(llm)
    assert info.value.code == "upstream_timeout" and "1.5s" in str(info.value)
    await llm.close()

    attempts = []

    def flaky(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        if len(attempts) < 3:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, content=sse(delta("up"), delta(finish="stop")))

    llm = backend(flaky, connect_retries=2)
    events = await run(llm)
    assert len(attempts) == 3 and events[0] == TextDelta("up")
    attempts.clear()
    await llm.close()
    llm = backend(flaky, connect_retries=1)
    with pytest.raises(LLMError) as info:
        await run(llm)
    assert info.value.code == "upstream_unreachable" and info.value.details["attempts"] == 2
    await llm.close()


async def test_servers_that_reject_stream_options_are_asked_again_without():
    bodies: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        if "stream_options" in body:
            return httpx.Response(400, json={"error": {"message": "Unrecognized request argument: stream_options"}})
        return httpx.Response(200, content=sse(delta("ok"), delta(finish="stop")))

    llm = backend(handler)
    assert (await run(llm))[0] == TextDelta("ok")
    assert (await run(llm))[0] == TextDelta("ok")
    assert len(bodies) == 3  # the second request no longer asks
    await llm.close()


async def test_count_tokens_estimate():
    llm = OpenAICompatLLM("http://x/v1", None, "m")
    short = await llm.count_tokens([ChatMessage("user", "hi")])
    long = await llm.count_tokens([ChatMessage("user", "word " * 400)])
    assert 0 < short < 10 and 450 < long < 560
    await llm.close()


# ------------------------------------------------------------------ routing and configuration


def settings(tmp_path: Any, **kw: Any) -> Settings:
    return Settings(model_cache_dir=tmp_path, llm_model="smollm2-135m",
                    providers={"groq": ProviderConfig(base_url="http://groq.test/v1", api_key_env="TEST_GROQ_KEY",
                                                      context_length=32000, models=["llama-3.1-8b"])}, **kw)


async def test_registry_routes_provider_models(tmp_path: Any, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TEST_GROQ_KEY", "sk-groq")
    registry = LLMRegistry(settings(tmp_path), factory=lambda *a, **k: pytest.fail("no local model loads"))
    llm = await registry.resolve("groq/llama-3.1-8b")
    assert isinstance(llm, OpenAICompatLLM)
    assert (llm.name, llm.model, llm.base_url, llm.context_length) == (
        "groq/llama-3.1-8b", "llama-3.1-8b", "http://groq.test/v1", 32000)
    assert llm._endpoint.headers["Authorization"] == "Bearer sk-groq"
    nested = await registry.resolve("groq/meta/llama-3")  # model names may contain slashes themselves
    assert isinstance(nested, OpenAICompatLLM) and nested.model == "meta/llama-3"
    # A provider we do not have (a hosted service's name): the default model serves it...
    assert registry.validate("nope/model") is None and registry.effective("nope/model") == "smollm2-135m"
    assert registry.validate("groq/x") is None and registry.effective("groq/x") == "groq/x"
    assert registry.validate("gpt-realtime") is None and registry.validate("smollm2-135m") is None
    assert registry.effective("llama-3.3-70b-versatile") == "smollm2-135m"
    assert registry.validate("/tmp/x.gguf")  # paths are off by default
    assert "groq/llama-3.1-8b" in [m["id"] for m in registry.available_models()]
    await registry.close()
    # ...unless the operator asked for strict names.
    strict = LLMRegistry(settings(tmp_path, strict_names=True), factory=lambda *a, **k: pytest.fail("no load"))
    with pytest.raises(LLMError) as info:
        await strict.resolve("nope/model")
    assert info.value.code == "model_not_found" and "groq" in str(info.value)
    assert strict.validate("nope/model") and strict.validate("llama-3.3-70b-versatile")
    assert strict.validate("gpt-realtime") is None and strict.validate("gpt-4o-mini-realtime-preview") is None
    await strict.close()


async def test_provider_as_the_server_default(tmp_path: Any):
    registry = LLMRegistry(Settings(model_cache_dir=tmp_path, llm_model="groq/big",
                                    providers={"groq": ProviderConfig(base_url="http://g/v1")}))
    llm = await registry.resolve("gpt-realtime")  # OpenAI names mean "the server default"
    assert isinstance(llm, OpenAICompatLLM) and llm.name == "groq/big"
    assert registry.default_model == "groq/big"
    await registry.close()


def test_remote_speech_stages_from_settings(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPENREALTIME_PROVIDERS", '{"oai": {"base_url": "http://oai.test/v1", "api_key": "sk-secret"}}')
    monkeypatch.setenv("OPENREALTIME_STT_PROVIDER", "oai")
    monkeypatch.setenv("OPENREALTIME_TTS_PROVIDER", "oai")
    monkeypatch.setenv("OPENREALTIME_TTS_REMOTE_MODEL", "gpt-4o-mini-tts")
    monkeypatch.setenv("OPENREALTIME_TTS_REMOTE_VOICES", '["nova", "onyx"]')
    from openrealtime.config import load_settings

    s = load_settings()
    assert "sk-secret" not in repr(s.providers["oai"])  # keys stay out of logs
    stages = load_speech_backends(SimpleNamespace(**{**s.__dict__, "vad_enabled": False}))
    assert isinstance(stages.stt, OpenAICompatSTT) and stages.stt.model == "whisper-1"
    assert isinstance(stages.tts, OpenAICompatTTS) and stages.tts.model == "gpt-4o-mini-tts"
    assert [v.id for v in stages.tts.voices()] == ["nova", "onyx"] and stages.tts.sample_rate == 24000
    with pytest.raises(ValueError, match="not a configured provider"):
        load_speech_backends(SimpleNamespace(stt_provider="missing", providers={}, vad_enabled=False,
                                             tts_enabled=False))


def test_speech_encoders_round_trip():
    import numpy as np

    t = np.arange(24000) / 24000
    pcm = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes()
    for fmt, ext in (("wav", "wav"), ("mp3", "mp3"), ("opus", "ogg"), ("flac", "flac"), ("aac", "aac")):
        enc = StreamEncoder(fmt, 24000)
        data = b"".join(enc.encode(pcm[i:i + 4800]) for i in range(0, len(pcm), 4800)) + enc.finish()
        back = decode_audio(data, f"x.{ext}", rate=16000)
        assert 0.95 < len(back) / 32000 < 1.1, fmt
