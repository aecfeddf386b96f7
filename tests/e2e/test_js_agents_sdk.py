"""The official OpenAI Agents JS SDK (`@openai/agents`, npm, pinned in tests/e2e/js/package.json) as a
client of the real server over its WebSocket transport: a RealtimeSession with a RealtimeAgent,
driven by tests/e2e/js/driver_ws.mjs, for a text turn, a spoken turn (server VAD, transcription,
spoken answer) and a function-tool round trip that ends in a spoken answer.

The SDK parses every server event with its own zod schemas and throws on item shapes it does not
accept; the driver reports any uncaught exception, unhandled rejection or SDK error event, and
re-checks every raw event with the SDK's schemas (lib/sdk_check.mjs). Each run's JSON lines are
saved in test-artifacts/js-agents-<scenario>.jsonl.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ..audio_fixtures import silence, speak, speech_available, write_wav
from .conftest import ARTIFACTS, Server, assert_valid_server_event
from .js_sdk import js_sdk_dir, node_path
from .zod_check import ZodValidator

pytestmark = pytest.mark.e2e

QUESTION = "What is the capital of France?"
RATE = 24_000
DRIVER_TIMEOUT_S = 90
PCM_BYTES_PER_S = RATE * 2


@pytest.fixture(scope="module")
def js_dir() -> Path:
    return js_sdk_dir()


@dataclass
class DriverRun:
    returncode: int
    events: list[dict] = field(default_factory=list)
    verdicts: list[dict] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    stderr: str = ""

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def of(self, type_: str) -> list[dict]:
        return [e for e in self.events if e["type"] == type_]

    def index(self, type_: str) -> int:
        types = self.types()
        assert type_ in types, (type_, types)
        return types.index(type_)


def run_driver(js_dir: Path, server: Server, scenario: str, *extra: str,
               timeout_s: int = DRIVER_TIMEOUT_S) -> DriverRun:
    cmd = [node_path(), str(js_dir / "driver_ws.mjs"), "--url", f"{server.ws_url}/v1/realtime?model=gpt-realtime",
           "--key", server.api_key, "--scenario", scenario, "--timeout-s", str(timeout_s), *extra]
    # The driver ends itself timeout_s + 30 s in at the latest (its own deadline), with a summary.
    proc = subprocess.run(cmd, cwd=js_dir, capture_output=True, text=True, timeout=timeout_s + 60)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"js-agents-{scenario}.jsonl").write_text(proc.stdout + (f"\n# stderr\n{proc.stderr}"
                                                                          if proc.stderr else ""))
    run = DriverRun(proc.returncode, stderr=proc.stderr)
    for line in proc.stdout.splitlines():
        record = json.loads(line)
        if record["kind"] == "event":
            run.events.append(record["event"])
            run.verdicts.append(record["zod"])
        elif record["kind"] == "problem":
            run.problems.append(record)
        elif record["kind"] == "summary":
            run.summary = record
    return run


def brief(problems: list[dict]) -> list[dict]:
    """Problems without stack traces, for readable assertion messages."""
    return [{"source": p["source"], "t": p.get("t"),
             "error": {k: v for k, v in p["error"].items() if k != "stack"} if isinstance(p["error"], dict)
             else p["error"]} for p in problems]


def check_clean(run: DriverRun) -> None:
    """No crash, no SDK error, every event accepted by the SDK's zod schemas and by openai-python's."""
    assert run.summary, f"driver printed no summary (exit {run.returncode}):\n{run.stderr[-3000:]}"
    failures = run.summary["zod_failures"]
    assert not run.problems and not failures, json.dumps(
        {"problems": brief(run.problems), "zod_failures": failures}, indent=1)[:8000]
    assert run.summary["completed"], ("scenario did not complete", run.summary["event_types"],
                                      [(e["response"].get("status"), e["response"].get("status_details"))
                                       for e in run.of("response.done")])
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    assert "error" not in run.types(), run.of("error")
    invalid = []
    for event in run.events:
        try:
            assert_valid_server_event(event)
        except Exception as exc:  # collect them all, then fail once
            invalid.append((event.get("type"), str(exc)[:500]))
    assert not invalid, invalid


def assert_answered(response: dict) -> None:
    """Completed, or cut at max_output_tokens (the tiny test model can be wordy): not failed or cancelled."""
    assert response["status"] == "completed" or (
        response["status"] == "incomplete" and (response.get("status_details") or {}).get("reason")
        == "max_output_tokens"), response


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def history_items(run: DriverRun, type_: str = "message", role: str | None = None) -> list[dict]:
    return [i for i in run.summary["history"] if i.get("type") == type_ and (role is None or i.get("role") == role)]


def audio_response(run: DriverRun, response_id: str) -> int:
    """PCM bytes the SDK decoded from the response's output_audio deltas (its `audio` events)."""
    assert any(e["response_id"] == response_id for e in run.of("response.output_audio.delta")), run.types()
    return run.summary["audio_bytes_by_response"].get(response_id, 0)


def test_zod_check_rejects_what_the_sdk_rejects(js_dir: Path):
    """The checker itself (validate.mjs, used by the driver's lib too) catches the SDK's failures."""
    user_audio = {"type": "conversation.item.added", "event_id": "event_1", "previous_item_id": None,
                  "item": {"id": "item_1", "type": "message", "object": "realtime.item", "status": "completed",
                           "role": "user", "content": [{"type": "input_audio"}]}}
    validator = ZodValidator()
    try:
        assert "conversation.item.added" in validator.typed_event_types
        verdict = validator.check(user_audio)
        # The crash of issue 9: the SDK's realtimeMessageItemSchema wants `transcript: string | null`.
        assert not verdict["ok"] and verdict["errors"][0]["step"] == "transport._onMessage", verdict
        branches = verdict["errors"][0]["issues"][0]["branches"]
        assert any(i["path"] == "content.0.transcript" for branch in branches for i in branch), branches
        user_audio["item"]["content"][0]["transcript"] = None
        assert validator.check(user_audio)["ok"]
        # A known type that fails its schema is silently dropped by the SDK: reported too.
        bad_done = {"type": "response.done", "event_id": "event_2", "response": {"status": "finished"}}
        verdict = validator.check(bad_done)
        assert not verdict["ok"] and verdict["errors"][0]["step"] == "realtimeServerEventSchema", verdict
        # Types the SDK has no schema for are accepted generically, and said to be.
        assert validator.check({"type": "input_audio_buffer.timeout_triggered", "event_id": "event_3"}) \
            == {"ref": None, "ok": True, "type": "input_audio_buffer.timeout_triggered", "typed": False, "errors": []}
    finally:
        validator.close()


def test_text_turn(js_dir: Path, server: Server):
    run = run_driver(js_dir, server, "text", "--question", QUESTION)
    check_clean(run)
    types = run.types()
    assert types[0] == "session.created", types[:3]
    [done] = run.of("response.done")
    response = done["response"]
    assert_answered(response)
    text = "".join(e["delta"] for e in run.of("response.output_text.delta"))
    assert text.strip(), types
    [text_done] = run.of("response.output_text.done")
    assert text_done["text"] == text and text_done["response_id"] == response["id"]
    # The SDK built its own history from the item events: the question and the answer.
    [user] = history_items(run, role="user")
    assert user["content"] == [{"type": "input_text", "text": QUESTION}], user
    [assistant] = history_items(run, role="assistant")
    assert assistant["status"] in ("completed", "incomplete"), assistant
    assert [c["type"] for c in assistant["content"]] == ["output_text"] and assistant["content"][0]["text"] == text
    assert {"type": "agent_end", "text": text} in run.summary["sdk_events"], run.summary["sdk_events"]
    print(f"\n@openai/agents {run.summary['sdk']['version']} (WebSocket) text turn: {text!r}; "
          f"{len(run.events)} events, {run.summary['elapsed_ms']} ms")


@pytest.mark.skipif(not speech_available(), reason="no speech synthesizer for test audio")
def test_spoken_turn(js_dir: Path, server: Server, tmp_path: Path):
    wav = write_wav(tmp_path / "question-24k.wav", silence(500) + speak(QUESTION, RATE), RATE)
    run = run_driver(js_dir, server, "voice", "--wav", str(wav))
    check_clean(run)
    assert run.index("input_audio_buffer.speech_started") < run.index("input_audio_buffer.speech_stopped") \
        < run.index("input_audio_buffer.committed") < run.index("response.created")
    item_id = run.of("input_audio_buffer.committed")[0]["item_id"]
    [transcript] = run.of("conversation.item.input_audio_transcription.completed")
    assert transcript["item_id"] == item_id
    assert {"capital", "france"} <= words(transcript["transcript"]), transcript["transcript"]

    [done] = run.of("response.done")
    response = done["response"]
    assert_answered(response)
    assert audio_response(run, response["id"]) >= PCM_BYTES_PER_S // 2  # at least half a second of speech
    [spoken] = run.of("response.output_audio_transcript.done")
    assert spoken["response_id"] == response["id"] and spoken["transcript"].strip(), spoken

    # The SDK asked for the transcribed item and got it; its history holds both sides of the turn.
    assert any(e["item"]["id"] == item_id for e in run.of("conversation.item.retrieved")), run.types()
    [user] = history_items(run, role="user")
    assert user["itemId"] == item_id and user["content"][0]["type"] == "input_audio", user
    assert {"capital", "france"} <= words(user["content"][0]["transcript"] or ""), user
    [assistant] = history_items(run, role="assistant")
    assert assistant["content"][0]["type"] == "output_audio", assistant
    assert (assistant["content"][0].get("transcript") or "").strip() == spoken["transcript"].strip(), assistant
    print(f"\n@openai/agents (WebSocket) heard {transcript['transcript']!r}, answered {spoken['transcript']!r} "
          f"({audio_response(run, response['id']) / PCM_BYTES_PER_S:.1f} s of audio); {run.summary['elapsed_ms']} ms")


def test_tool_round_trip_with_spoken_answer(js_dir: Path, server: Server):
    run = run_driver(js_dir, server, "tool")
    check_clean(run)
    # The SDK ran the tool once, with the city from the question.
    assert len(run.summary["tool_calls"]) == 1, run.summary["tool_calls"]
    city = run.summary["tool_calls"][0]["city"]
    assert "paris" in city.lower(), city
    starts = [e for e in run.summary["sdk_events"] if e["type"] == "agent_tool_start"]
    ends = [e for e in run.summary["sdk_events"] if e["type"] == "agent_tool_end"]
    assert [e["tool"] for e in starts] == ["get_weather"] and json.loads(starts[0]["arguments"]) == {"city": city}
    assert ends and ends[0]["result"].startswith("The weather in")

    first, second, *rest = [e["response"] for e in run.of("response.done")]
    assert not rest, [r["output"] for r in rest]
    assert [o["type"] for o in first["output"]] == ["function_call"], first["output"]
    call = first["output"][0]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": city}, call
    [output] = [e["item"] for e in run.of("conversation.item.added") if e["item"]["type"] == "function_call_output"]
    assert output["call_id"] == call["call_id"] and "sunny" in output["output"], output

    # The answer to the tool's output is spoken.
    assert_answered(second)
    assert [o["type"] for o in second["output"]] == ["message"], second["output"]
    assert second["output"][0]["content"][0]["type"] == "output_audio", second["output"]
    assert audio_response(run, second["id"]) >= PCM_BYTES_PER_S // 2
    [tool_item] = history_items(run, type_="function_call")
    assert tool_item["name"] == "get_weather" and "sunny" in (tool_item["output"] or ""), tool_item
    spoken = [e["transcript"] for e in run.of("response.output_audio_transcript.done")
              if e["response_id"] == second["id"]]
    print(f"\n@openai/agents (WebSocket) called get_weather({city!r}) and said {spoken}; "
          f"{run.summary['elapsed_ms']} ms")
