"""Remote backends against a real third-party OpenAI-compatible server (llama-cpp-python's server).

Our server ("remote") gets providers:
- ``up``: llama_cpp.server on SmolLM2 (started here; killed and restarted by one test),
- ``dead``: a closed loopback port,
- ``badkey``: the same llama_cpp.server with a wrong API key,
- ``a``: the session-wide openrealtime server of conftest, whose /v1/audio endpoints serve as this
  server's remote STT and TTS (``stt_provider`` / ``tts_provider``).

Everything goes over the official openai SDK, and every Realtime event is validated strictly.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import wave
from collections.abc import Iterator
from typing import Any

import pytest
import websockets

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
from tests.audio_fixtures import speak, speech_available

from .conftest import Server, client, collect, free_port, start_server, stop_server
from .llama_upstream import MODEL_ALIAS, UPSTREAM_KEY, LlamaUpstream, require_llama_server, smollm2_path

pytestmark = pytest.mark.e2e

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def upstream() -> Iterator[LlamaUpstream]:
    up = LlamaUpstream(require_llama_server(), smollm2_path())
    up.start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def remote_server(upstream: LlamaUpstream, server: Server) -> Iterator[Server]:
    providers = {
        "up": {"base_url": upstream.base_url, "api_key": UPSTREAM_KEY, "models": [MODEL_ALIAS], "timeout_s": 30},
        "dead": {"base_url": f"http://127.0.0.1:{free_port()}/v1", "connect_retries": 1, "connect_timeout_s": 2},
        "badkey": {"base_url": upstream.base_url, "api_key": "sk-wrong"},
        "a": {"base_url": f"{server.base_url}/v1", "api_key": server.api_key},
    }
    srv = start_server({
        "OPENREALTIME_PROVIDERS": json.dumps(providers),
        "OPENREALTIME_STT_PROVIDER": "a",
        "OPENREALTIME_TTS_PROVIDER": "a",
        "OPENREALTIME_TTS_REMOTE_VOICES": '["joe"]',
        # Unknown providers are errors here (the default maps them to the default model; see
        # tests/e2e/test_dialects.py).
        "OPENREALTIME_STRICT_NAMES": "true",
    }, name="remote")
    yield srv
    stop_server(srv)
    text = srv.log_text()
    assert "Traceback" not in text, text[-4000:]
    assert "Task was destroyed" not in text, text[-4000:]


async def ask(conn: Any, text: str, max_tokens: int = 30) -> list[dict]:
    await conn.conversation.item.create(item={
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})
    await conn.response.create(response={"max_output_tokens": max_tokens})
    return await collect(conn, "response.done")


async def use_model(conn: Any, model: str, **session: Any) -> dict:
    await conn.session.update(session={"type": "realtime", "model": model, "output_modalities": ["text"],
                                       **session})
    return (await collect(conn, "session.updated"))[-1]["session"]


def upstream_requests(upstream: LlamaUpstream) -> int:
    return upstream.log_path.read_text(errors="replace").count("POST /v1/chat/completions")


# ------------------------------------------------------------------ the backend itself


async def test_backend_streams_text_and_a_tool_call_from_llama_cpp_python(upstream: LlamaUpstream):
    llm = OpenAICompatLLM(upstream.base_url, UPSTREAM_KEY, MODEL_ALIAS, name="up")
    try:
        events = [e async for e in llm.stream([ChatMessage("user", "Say hello.")], GenerationParams(max_tokens=12))]
        assert all(isinstance(e, TextDelta) for e in events[:-1]) and len(events) > 1
        assert isinstance(events[-1], Finished) and events[-1].finish_reason in ("stop", "length")
        assert events[-1].usage.completion_tokens > 0

        tool = ToolSpec(**WEATHER_TOOL)
        params = GenerationParams(max_tokens=60, temperature=0.0, tools=[tool], tool_choice="get_weather")
        messages = [ChatMessage("user", "What is the weather in Paris?")]
        events = [e async for e in llm.stream(messages, params)]
        deltas = [e for e in events if isinstance(e, ToolCallDelta)]
        assert deltas and deltas[0].index == 0 and deltas[0].name == "get_weather" and deltas[0].call_id
        assert all(d.call_id is None and d.name is None for d in deltas[1:])  # continuations: arguments only
        arguments = json.loads("".join(d.arguments for d in deltas))
        assert isinstance(arguments.get("city"), str)
        assert isinstance(events[-1], Finished) and events[-1].finish_reason == "tool_calls"

        # The answer to the call goes back as an assistant tool_calls turn plus a tool turn.
        follow_up = [*messages,
                     ChatMessage("assistant", "", tool_calls=[ToolCall(deltas[0].call_id or "", "get_weather",
                                                                       json.dumps(arguments))]),
                     ChatMessage("tool", '{"temperature_c": 21, "sky": "sunny"}', tool_call_id=deltas[0].call_id)]
        events = [e async for e in llm.stream(follow_up, GenerationParams(max_tokens=30, tools=[tool],
                                                                          tool_choice="none"))]
        assert isinstance(events[-1], Finished)
    finally:
        await llm.close()


async def test_backend_close_mid_stream_frees_the_upstream(upstream: LlamaUpstream):
    llm = OpenAICompatLLM(upstream.base_url, UPSTREAM_KEY, MODEL_ALIAS)
    try:
        stream = llm.stream([ChatMessage("user", "Count from 1 to 500.")], GenerationParams(max_tokens=800))
        first = await anext(stream)
        assert isinstance(first, TextDelta)
        await stream.aclose()  # closes the HTTP response: the upstream stops generating
        async with asyncio.timeout(30):  # ... and serves the next request at once
            events = [e async for e in llm.stream([ChatMessage("user", "Hi")], GenerationParams(max_tokens=5))]
        assert isinstance(events[-1], Finished)
    finally:
        await llm.close()


async def test_backend_unreachable_after_retries():
    llm = OpenAICompatLLM(f"http://127.0.0.1:{free_port()}/v1", None, "m", connect_retries=2, retry_backoff_s=0.05)
    with pytest.raises(LLMError) as info:
        async for _ in llm.stream([ChatMessage("user", "hi")], GenerationParams()):
            pass
    assert info.value.code == "upstream_unreachable" and info.value.details["attempts"] == 3
    await llm.close()


# ------------------------------------------------------------------ through the Realtime API


async def test_streaming_text_turn_on_a_provider_model(remote_server: Server, upstream: LlamaUpstream):
    before = upstream_requests(upstream)
    async with client(remote_server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        session = await use_model(conn, f"up/{MODEL_ALIAS}", instructions="You are terse.")
        assert session["model"] == f"up/{MODEL_ALIAS}"
        events = await ask(conn, "Say hello.")
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert len(deltas) > 1, "no streamed text"
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert done["text"] == "".join(deltas) and done["text"].strip()
    response = events[-1]["response"]
    assert response["status"] in ("completed", "incomplete"), response["status_details"]
    assert response["usage"]["output_tokens"] > 0 and response["usage"]["input_tokens"] > 0
    assert upstream_requests(upstream) > before, "the upstream server did not serve the turn"


async def test_tool_call_on_a_provider_model(remote_server: Server):
    from openrealtime.engine import response as engine_response

    if "ToolCallDelta" not in inspect.getsource(engine_response):
        pytest.skip("the engine does not handle tool calls yet (tests the provider path once it does)")
    async with client(remote_server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await use_model(conn, f"up/{MODEL_ALIAS}", tools=[{"type": "function", **WEATHER_TOOL}],
                        tool_choice={"type": "function", "name": "get_weather"})
        events = await ask(conn, "What is the weather in Paris?", max_tokens=60)
    response = events[-1]["response"]
    assert response["status"] == "completed", response["status_details"]
    call = next(o for o in response["output"] if o["type"] == "function_call")
    assert call["name"] == "get_weather" and isinstance(json.loads(call["arguments"]).get("city"), str)
    types = [e["type"] for e in events]
    assert "response.function_call_arguments.delta" in types and "response.function_call_arguments.done" in types


async def test_unknown_provider_is_rejected_at_session_update_with_strict_names(remote_server: Server):
    async with client(remote_server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "model": "nope/some-model"})
        error = (await collect(conn, "error"))[-1]["error"]
        assert error["code"] == "model_not_found" and error["param"] == "session.model"
        assert "nope" in error["message"] and "up" in error["message"]
        # The session keeps its model and goes on.
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        assert (await collect(conn, "session.updated"))[-1]["session"]["model"] != "nope/some-model"


async def test_unknown_provider_in_the_connect_url_is_refused_with_strict_names(remote_server: Server):
    url = f"{remote_server.ws_url}/v1/realtime?model=nope/some-model"
    with pytest.raises(websockets.InvalidStatus) as exc:
        async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {remote_server.api_key}"}):
            pass
    assert exc.value.response.status_code == 400
    error = json.loads(exc.value.response.body)["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"


async def test_unreachable_provider_fails_the_response_and_the_session_goes_on(remote_server: Server):
    async with client(remote_server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await use_model(conn, "dead/any-model")
        response = (await ask(conn, "Hello?"))[-1]["response"]
        assert response["status"] == "failed"
        error = response["status_details"]["error"]
        assert error["code"] == "upstream_unreachable" and "Cannot reach" in error["message"]
        await use_model(conn, f"up/{MODEL_ALIAS}")
        response = (await ask(conn, "Say hi."))[-1]["response"]
        assert response["status"] in ("completed", "incomplete")


async def test_upstream_http_error_is_in_status_details(remote_server: Server):
    async with client(remote_server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await use_model(conn, f"badkey/{MODEL_ALIAS}")
        response = (await ask(conn, "Hello?"))[-1]["response"]
    assert response["status"] == "failed"
    error = response["status_details"]["error"]
    assert error["code"] == "upstream_auth_failed"
    assert "HTTP 401" in error["message"] and "Invalid API key" in error["message"]


async def test_upstream_killed_mid_stream_then_the_session_answers_again(remote_server: Server,
                                                                        upstream: LlamaUpstream):
    async with client(remote_server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await use_model(conn, f"up/{MODEL_ALIAS}")
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Count from 1 to 1000, separated by commas."}]})
        await conn.response.create(response={"max_output_tokens": 1500})
        events = await collect(conn, "response.output_text.delta")
        upstream.kill()  # a crash, mid-stream
        try:
            events += await collect(conn, "response.done")
            response = events[-1]["response"]
            assert response["status"] == "failed", response
            error = response["status_details"]["error"]
            assert error["code"] == "upstream_disconnected", error
            assert "mid-response" in error["message"] or "ended the stream" in error["message"]
            assert response["output"][0]["status"] == "incomplete"
        finally:
            upstream.start()
        response = (await ask(conn, "Say hi."))[-1]["response"]
        assert response["status"] in ("completed", "incomplete"), response["status_details"]
        assert response["output"][0]["content"][0]["text"].strip()


# ------------------------------------------------------------------ /v1/chat/completions on a provider model


async def test_chat_completions_endpoint_maps_tool_calls(remote_server: Server):
    """Our endpoint proxying a provider model: tool-call deltas come out in OpenAI's chunk shape."""
    api = client(remote_server)
    kwargs: dict[str, Any] = {
        "model": f"up/{MODEL_ALIAS}", "max_tokens": 60, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [{"type": "function", "function": WEATHER_TOOL}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    result = await api.chat.completions.create(**kwargs)
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert isinstance(json.loads(call.function.arguments)["city"], str)

    chunks = [c async for c in await api.chat.completions.create(**kwargs, stream=True)]
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert isinstance(json.loads(arguments)["city"], str)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]

    # The result goes back as an assistant tool_calls message plus a tool message.
    follow = await api.chat.completions.create(
        model=f"up/{MODEL_ALIAS}", max_tokens=20,
        messages=[*kwargs["messages"],
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": call.id, "type": "function",
                       "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
                  {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}])
    assert follow.choices[0].finish_reason in ("stop", "length")


# ------------------------------------------------------------------ remote STT and TTS (provider "a")


@pytest.fixture(scope="module")
def need_speech() -> None:
    if not speech_available():
        pytest.skip("no speech synthesizer for the test audio")


async def test_remote_tts_and_stt_through_another_openrealtime(remote_server: Server, need_speech: None):
    api = client(remote_server)
    voices = (await api.get("/voices", cast_to=dict))["data"]
    assert [v["id"] for v in voices] == ["joe"]
    async with api.audio.speech.with_streaming_response.create(
            model="tts-1", voice="joe", input="The weather is sunny today.", response_format="pcm") as resp:
        pcm = await resp.read()
    assert 0.8 < len(pcm) / 48000 < 6
    buf = io.BytesIO()
    with wave.open(buf, "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(16000)
        fh.writeframes(speak("The quick brown fox jumps over the lazy dog.", rate=16000))
    result = await api.audio.transcriptions.create(model="whisper-1", file=("speech.wav", buf.getvalue()))
    assert {"quick", "brown", "fox"} <= set(result.text.lower().replace(".", "").replace(",", "").split())


async def test_spoken_reply_from_a_provider_model_with_remote_tts(remote_server: Server):
    async with client(remote_server).realtime.connect(model="gpt-realtime") as conn:
        created = await collect(conn, "session.created")
        assert created[0]["session"]["audio"]["output"]["voice"] == "joe"
        await conn.session.update(session={"type": "realtime", "model": f"up/{MODEL_ALIAS}",
                                           "output_modalities": ["audio"]})
        await collect(conn, "session.updated")
        events = await ask(conn, "Say hello in one short sentence.", max_tokens=25)
    response = events[-1]["response"]
    assert response["status"] in ("completed", "incomplete"), response["status_details"]
    audio = [e for e in events if e["type"] == "response.output_audio.delta"]
    assert audio, "no audio from the remote TTS"
