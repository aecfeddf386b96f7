"""The openai-agents SDK decides on a tool by itself, from speech, on the default model: a RealtimeAgent
with a `get_weather` function tool, run by RealtimeRunner against our WebSocket endpoint on
qwen2.5-1.5b with the session's `tool_choice` left at "auto". The user's question is spoken (server
VAD, transcription); the model calls the tool, the SDK runs it and sends its output back, and the
spoken answer that follows says what the tool returned, in plain words.

Every server event the SDK received is saved in test-artifacts/agents-tools-auto.jsonl, with the
milliseconds since the session started (`t`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ..audio_fixtures import silence, speak
from .conftest import ARTIFACTS, Server, invalid_events
from .tool_auto import MODEL, QUESTION, TOOL_SYNTAX, WAIT_S, default_model_server, says_23, weather

pytest.importorskip("agents", reason="openai-agents is not installed")
from agents import function_tool
from agents.realtime import RealtimeAgent, RealtimeRunner

pytestmark = pytest.mark.e2e

RATE = 24_000
PCM_BYTES_PER_S = RATE * 2


@pytest.fixture(scope="module")
def server_15b() -> Iterator[Server]:
    yield from default_model_server("agents-tools-auto")


def story(server_events: list[dict], transcripts: dict[str, str]) -> str:
    """What happened, for failure messages: the responses' outputs, what was heard and said."""
    heard = [e.get("transcript") for e in server_events
             if e.get("type") == "conversation.item.input_audio_transcription.completed"]
    responses = [{"status": e["response"].get("status"), "status_details": e["response"].get("status_details"),
                  "output": [{k: o.get(k) for k in ("type", "name", "arguments")} for o in e["response"]["output"]],
                  "transcript": transcripts.get(e["response"]["id"])}
                 for e in server_events if e.get("type") == "response.done"]
    types = [e.get("type") for e in server_events if "delta" not in str(e.get("type"))]
    return json.dumps({"heard": heard, "responses": responses, "event_types": types}, indent=1)[:8000]


def message_transcripts(response: dict) -> list[str]:
    return [c.get("transcript") or c.get("text") or "" for o in response["output"] if o["type"] == "message"
            for c in o.get("content") or []]


async def test_spoken_question_gets_a_tool_call_under_auto(server_15b: Server):
    ran: list[str] = []

    @function_tool
    async def get_weather(city: str) -> str:
        """Get the current weather for a city."""
        ran.append(city)
        return weather(city)

    agent = RealtimeAgent(name="Assistant", instructions="You are a weather assistant. Answer in one short sentence.",
                          tools=[get_weather])
    runner = RealtimeRunner(agent, config={"model_settings": {
        "model_name": "gpt-realtime",
        "output_modalities": ["audio"],
        "input_audio_transcription": {"model": "whisper-1"},
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 500},
        "max_output_tokens": 80,
        # tool_choice is not set: the server's default, "auto", lets the model decide.
    }})
    session = await runner.run(model_config={"url": f"{server_15b.ws_url}/v1/realtime?model=gpt-realtime",
                                             "api_key": server_15b.api_key})
    errors: list[Any] = []
    server_events: list[dict] = []
    received_ms: list[int] = []  # when each server event came, since the session started
    sdk_events: list[Any] = []  # tool_start / tool_end
    audio_bytes: dict[str, int] = {}  # response id -> PCM bytes the SDK emitted as `audio`
    transcripts: dict[str, str] = {}  # response id -> output audio transcript
    pcm = silence(500, RATE) + speak(QUESTION, RATE) + silence(2000, RATE)

    async def mic() -> None:
        """Like a microphone, in 100 ms chunks, 4x faster than real time."""
        step = RATE // 10 * 2
        for i in range(0, len(pcm), step):
            await session.send_audio(pcm[i:i + step])
            await asyncio.sleep(0.025)

    def finished() -> bool:
        """The answer to the tool's output is done, or nothing more is coming."""
        output_at = next((i for i, e in enumerate(server_events) if e.get("type") == "conversation.item.added"
                          and e["item"]["type"] == "function_call_output"), None)
        dones = [e["response"] for e in server_events if e.get("type") == "response.done"]
        if any(r["status"] in ("failed", "cancelled") for r in dones) or len(dones) >= 4:
            return True
        if output_at is not None:
            return any(e.get("type") == "response.done" for e in server_events[output_at:])
        # A response that ended with no call (prose or nothing): the SDK has nothing to run.
        return any(not any(o["type"] == "function_call" for o in r["output"]) for r in dones)

    timed_out = False
    t0 = time.monotonic()
    async with session:
        sender = asyncio.create_task(mic())
        try:
            async with asyncio.timeout(WAIT_S):
                async for event in session:
                    if event.type == "error":
                        errors.append(event.error)
                    elif event.type in ("tool_start", "tool_end"):
                        sdk_events.append(event)
                    elif event.type == "audio":
                        rid = event.audio.response_id or ""
                        audio_bytes[rid] = audio_bytes.get(rid, 0) + len(event.audio.data)
                    elif event.type == "raw_model_event":
                        data = event.data
                        if data.type == "error":
                            errors.append(data.error)
                        elif data.type == "raw_server_event" and isinstance(data.data, dict):
                            server_events.append(data.data)
                            received_ms.append(round((time.monotonic() - t0) * 1000))
                            kind = data.data.get("type")
                            if kind == "error":
                                errors.append(data.data)
                            elif kind == "response.output_audio_transcript.done":
                                transcripts[data.data["response_id"]] = data.data["transcript"]
                            elif kind == "response.done" and finished():
                                break
        except TimeoutError:
            timed_out = True
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
    ARTIFACTS.mkdir(exist_ok=True)
    lines = [json.dumps({"t": t, "event": e}) for t, e in zip(received_ms, server_events, strict=True)]
    (ARTIFACTS / "agents-tools-auto.jsonl").write_text("".join(line + "\n" for line in lines))

    happened = story(server_events, transcripts)
    assert not timed_out, f"no spoken answer to the tool's output within {WAIT_S} s:\n{happened}"
    assert not errors, (errors, happened)
    assert not invalid_events(server_events), invalid_events(server_events)

    # The session the model decided in: tool_choice "auto" (the default), get_weather offered.
    sessions = [e["session"] for e in server_events if e.get("type") in ("session.created", "session.updated")]
    assert sessions and all(s.get("tool_choice") == "auto" for s in sessions), \
        [s.get("tool_choice") for s in sessions]
    assert [t["name"] for t in sessions[-1]["tools"]] == ["get_weather"], sessions[-1]["tools"]
    heard = [e["transcript"] for e in server_events
             if e.get("type") == "conversation.item.input_audio_transcription.completed"]
    assert heard and "paris" in heard[0].lower(), f"the question was not heard as asked:\n{happened}"

    # The model chose the call, and the SDK ran it once, with the city it heard.
    assert len(ran) == 1 and "paris" in ran[0].lower(), (ran, happened)
    starts = [e for e in sdk_events if e.type == "tool_start"]
    ends = [e for e in sdk_events if e.type == "tool_end"]
    assert [e.tool.name for e in starts] == ["get_weather"], (starts, happened)
    assert json.loads(starts[0].arguments) == {"city": ran[0]}, starts[0].arguments
    assert [e.tool.name for e in ends] == ["get_weather"] and ends[0].output == weather(ran[0]), ends

    dones = [e["response"] for e in server_events if e.get("type") == "response.done"]
    first = dones[0]
    assert [o["type"] for o in first["output"]] == ["function_call"], happened
    call = first["output"][0]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": ran[0]}, call

    # The SDK sent the tool's output back; the response after it speaks the result in plain words.
    output_at, output = next((i, e["item"]) for i, e in enumerate(server_events)
                             if e.get("type") == "conversation.item.added"
                             and e["item"]["type"] == "function_call_output")
    assert output["call_id"] == call["call_id"] and output["output"] == weather(ran[0]), output
    [answer] = [e["response"] for e in server_events[output_at:] if e.get("type") == "response.done"]
    assert answer["status"] == "completed" or (answer.get("status_details") or {}).get("reason") \
        == "max_output_tokens", (answer["status"], answer.get("status_details"), happened)
    assert [o["type"] for o in answer["output"]] == ["message"], happened
    assert answer["output"][0]["content"][0]["type"] == "output_audio", answer["output"]
    spoken = transcripts.get(answer["id"], "")
    assert spoken == answer["output"][0]["content"][0].get("transcript"), (spoken, answer["output"])
    assert says_23(spoken), f"the answer does not say the tool's result: {spoken!r}\n{happened}"
    assert not [s for s in TOOL_SYNTAX if s in spoken], f"tool syntax in the spoken answer: {spoken!r}"
    assert audio_bytes.get(answer["id"], 0) >= PCM_BYTES_PER_S // 2, audio_bytes  # half a second of speech

    # No response ended with nothing to say: each has its call or a non-empty transcript.
    for response in dones:
        said = message_transcripts(response)
        assert any(o["type"] == "function_call" for o in response["output"]) or (
            said and all(t.strip() for t in said)), f"a response ended with an empty transcript:\n{happened}"
    print(f"\nopenai-agents on {MODEL} heard {heard[0]!r}, called get_weather({ran[0]!r}), said {spoken!r} "
          f"({audio_bytes[answer['id']] / PCM_BYTES_PER_S:.1f} s of audio); {received_ms[-1]} ms")
