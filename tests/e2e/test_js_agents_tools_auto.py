"""The official OpenAI Agents JS SDK (`@openai/agents`) decides on a tool by itself, from speech, on
the default model: a RealtimeSession with a RealtimeAgent and a `get_weather` function tool, over
the WebSocket transport, against a server on qwen2.5-1.5b, with the session's `tool_choice` left at
the server's default "auto". The question is spoken (tests/e2e/js/driver_ws.mjs, scenario
`tool-auto`: server VAD, transcription); the model calls the tool, the SDK runs it and sends its
output back, and the spoken answer that follows says what the tool returned, in plain words.

The driver's JSON lines are saved in test-artifacts/js-agents-tool-auto.jsonl.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..audio_fixtures import silence, speak, write_wav
from .conftest import Server
from .js_sdk import js_sdk_dir
from .test_js_agents_sdk import (
    PCM_BYTES_PER_S,
    RATE,
    DriverRun,
    audio_response,
    check_clean,
    history_items,
    run_driver,
)
from .tool_auto import MODEL, QUESTION, TOOL_SYNTAX, WAIT_S, default_model_server, says_23, weather

pytestmark = pytest.mark.e2e

SCENARIO = "tool-auto"


@pytest.fixture(scope="module")
def js_dir() -> Path:
    return js_sdk_dir()


@pytest.fixture(scope="module")
def server_15b() -> Iterator[Server]:
    yield from default_model_server("js-agents-tools-auto")


def transcript_of(run: DriverRun, response_id: str) -> str | None:
    said = [e["transcript"] for e in run.of("response.output_audio_transcript.done") if e["response_id"] == response_id]
    return said[0] if said else None


def story(run: DriverRun) -> str:
    """What happened, for failure messages: what was heard, the responses' outputs and what they said."""
    responses = [{"status": r.get("status"), "status_details": r.get("status_details"),
                  "output": [{k: o.get(k) for k in ("type", "name", "arguments")} for o in r["output"]],
                  "transcript": transcript_of(run, r["id"])}
                 for r in (e["response"] for e in run.of("response.done"))]
    return json.dumps({"heard": [e["transcript"] for e in
                                 run.of("conversation.item.input_audio_transcription.completed")],
                       "responses": responses, "tool_calls": run.summary.get("tool_calls"),
                       "sdk_events": run.summary.get("sdk_events"),
                       "event_types": run.summary.get("event_types")}, indent=1)[:8000]


def test_spoken_question_gets_a_tool_call_under_auto(js_dir: Path, server_15b: Server, tmp_path: Path):
    wav = write_wav(tmp_path / "weather-question-24k.wav", silence(500) + speak(QUESTION, RATE), RATE)
    run = run_driver(js_dir, server_15b, SCENARIO, "--wav", str(wav), timeout_s=WAIT_S)
    check_clean(run)
    happened = story(run)

    # The session the model decided in: tool_choice "auto" (the default), get_weather offered.
    sessions = [e["session"] for e in run.events if e["type"] in ("session.created", "session.updated")]
    assert sessions and all(s.get("tool_choice") == "auto" for s in sessions), \
        [s.get("tool_choice") for s in sessions]
    assert [t["name"] for t in sessions[-1]["tools"]] == ["get_weather"], sessions[-1]["tools"]
    heard = [e["transcript"] for e in run.of("conversation.item.input_audio_transcription.completed")]
    assert heard and "paris" in heard[0].lower(), f"the question was not heard as asked:\n{happened}"

    # The model chose the call, and the SDK ran it once, with the city it heard.
    calls = run.summary["tool_calls"]
    assert len(calls) == 1 and "paris" in calls[0]["city"].lower(), happened
    city = calls[0]["city"]
    starts = [e for e in run.summary["sdk_events"] if e["type"] == "agent_tool_start"]
    ends = [e for e in run.summary["sdk_events"] if e["type"] == "agent_tool_end"]
    assert [e["tool"] for e in starts] == ["get_weather"] and json.loads(starts[0]["arguments"]) == {"city": city}, \
        starts
    assert [e["tool"] for e in ends] == ["get_weather"] and ends[0]["result"] == weather(city), ends

    dones = [e["response"] for e in run.of("response.done")]
    first = dones[0]
    assert [o["type"] for o in first["output"]] == ["function_call"], happened
    call = first["output"][0]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": city}, call

    # The SDK sent the tool's output back; the response after it speaks the result in plain words.
    output_at = next(i for i, e in enumerate(run.events) if e["type"] == "conversation.item.added"
                     and e["item"]["type"] == "function_call_output")
    output = run.events[output_at]["item"]
    assert output["call_id"] == call["call_id"] and output["output"] == weather(city), output
    [answer] = [e["response"] for e in run.events[output_at:] if e["type"] == "response.done"]
    assert answer["status"] == "completed" or (answer.get("status_details") or {}).get("reason") \
        == "max_output_tokens", (answer["status"], answer.get("status_details"), happened)
    assert [o["type"] for o in answer["output"]] == ["message"], happened
    assert answer["output"][0]["content"][0]["type"] == "output_audio", answer["output"]
    spoken = transcript_of(run, answer["id"]) or ""
    assert spoken == answer["output"][0]["content"][0].get("transcript"), (spoken, answer["output"])
    assert says_23(spoken), f"the answer does not say the tool's result: {spoken!r}\n{happened}"
    assert not [s for s in TOOL_SYNTAX if s in spoken], f"tool syntax in the spoken answer: {spoken!r}"
    assert audio_response(run, answer["id"]) >= PCM_BYTES_PER_S // 2  # at least half a second of speech
    [tool_item] = history_items(run, type_="function_call")
    assert tool_item["name"] == "get_weather" and tool_item["output"] == weather(city), tool_item

    # No response ended with nothing to say: each has its call or a non-empty transcript.
    for response in dones:
        said = [c.get("transcript") or "" for o in response["output"] if o["type"] == "message"
                for c in o.get("content") or []]
        assert any(o["type"] == "function_call" for o in response["output"]) or (
            said and all(t.strip() for t in said)), f"a response ended with an empty transcript:\n{happened}"
    assert len(dones) == 2, happened  # the call and the answer, nothing after
    print(f"\n@openai/agents {run.summary['sdk']['version']} on {MODEL} heard {heard[0]!r}, called "
          f"get_weather({city!r}), said {spoken!r} ({audio_response(run, answer['id']) / PCM_BYTES_PER_S:.1f} s "
          f"of audio); {run.summary['elapsed_ms']} ms")
