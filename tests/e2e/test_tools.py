"""Function calling, truncation and rate limits against the real server (SmolLM2-135M).

SmolLM2 is far too small to call tools on its own; with `required` or a named tool_choice the
server's schema-guided decoding makes every call valid anyway, which is what these tests pin.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from openrealtime.backends.tool_calling import MAX_DELTA_CHARS

from .conftest import Server, assert_valid_server_event, client, collect, start_server, stop_server
from .webrtc_client import hangup, open_call

pytestmark = pytest.mark.e2e

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"location": {"type": "string", "description": "City name"},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["location", "unit"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city.",
           "parameters": WEATHER_PARAMS}
TIME_PARAMS = {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}
TIME = {"type": "function", "name": "get_time", "description": "Get the current time in a timezone.",
        "parameters": TIME_PARAMS}
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
RESULT = json.dumps({"location": "Paris", "temperature": "23 degrees", "conditions": "sunny with a light breeze",
                     "advice": "a perfect afternoon for a walk along the Seine river"})


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def check_call_events(events: list[dict]) -> list[dict]:
    """The function_call items of a response, after checking their event stream is consistent."""
    response = events[-1]["response"]
    assert response["status"] == "completed", response
    calls = [o for o in response["output"] if o["type"] == "function_call"]
    for index, out in enumerate(response["output"]):
        if out["type"] != "function_call":
            continue
        added = next(e for e in events if e["type"] == "response.output_item.added" and e["output_index"] == index)
        assert added["item"]["status"] == "in_progress" and added["item"]["arguments"] == ""
        assert added["item"]["call_id"] == out["call_id"] and out["call_id"].startswith("call_")
        deltas = [e for e in events if e["type"] == "response.function_call_arguments.delta"
                  and e["item_id"] == out["id"]]
        done = next(e for e in events if e["type"] == "response.function_call_arguments.done"
                    and e["item_id"] == out["id"])
        assert all(e["output_index"] == index and e["call_id"] == out["call_id"] for e in [*deltas, done])
        assert "".join(e["delta"] for e in deltas) == done["arguments"] == out["arguments"]
        assert done["name"] == out["name"] and out["status"] == "completed"
        jsonschema.validate(json.loads(out["arguments"]), SCHEMAS[out["name"]])
        assert not any(e["type"].startswith("response.content_part") and e.get("item_id") == out["id"]
                       for e in events)
    assert response["usage"]["output_tokens"] > 0
    return calls


async def test_required_tool_call_round_trip(server: Server):
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await conn.session.update(session={
            "type": "realtime", "output_modalities": ["text"], "tools": [WEATHER], "tool_choice": "required",
            "instructions": "You are a weather assistant. Use the tools."})
        await collect(conn, "session.updated")
        await conn.conversation.item.create(item=user("What's the weather like in Paris right now?"))
        asked_id = (await collect(conn, "conversation.item.done"))[-1]["item"]["id"]
        await conn.response.create()
        events = await collect(conn, "response.done")
        [call] = check_call_events(events)
        assert call["name"] == "get_weather"
        first = events[-1]["response"]
        assert [o["type"] for o in first["output"]] == ["function_call"]

        # Baseline for the prompt size: the same context without the result (out of band).
        call_item = first["output"][0]["id"]
        await conn.response.create(response={
            "conversation": "none", "tool_choice": "none", "max_output_tokens": 1,
            "input": [{"type": "item_reference", "id": asked_id}, {"type": "item_reference", "id": call_item}]})
        baseline = (await collect(conn, "response.done"))[-1]["response"]["usage"]["input_tokens"]
        await conn.conversation.item.create(item={"type": "function_call_output", "call_id": call["call_id"],
                                                  "output": RESULT})
        added = (await collect(conn, "conversation.item.done"))[-1]
        assert added["previous_item_id"] == call["id"]
        # The answer: tools stay offered but the model may not call (per-response override).
        await conn.response.create(response={"tool_choice": "none", "max_output_tokens": 60})
        events = await collect(conn, "response.done")
        follow = events[-1]["response"]
        assert follow["status"] in ("completed", "incomplete")
        assert [o["type"] for o in follow["output"]] == ["message"]
        assert follow["output"][0]["content"][0]["text"].strip()
        # The result is in the prompt: the input grew by about its size.
        assert follow["usage"]["input_tokens"] >= baseline + 30
        # The session's tool_choice is back for the next response.
        await conn.conversation.item.create(item=user("And in Lyon?"))
        await conn.response.create()
        [again] = check_call_events(await collect(conn, "response.done"))
        assert again["call_id"] != call["call_id"]


async def test_named_choice_and_two_tools(server: Server):
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                           "tools": [WEATHER, TIME], "tool_choice": "auto"})
        await collect(conn, "session.updated")
        await conn.conversation.item.create(item=user("What time is it in Tokyo, and the weather in Oslo?"))
        for name in ("get_time", "get_weather"):
            await conn.response.create(response={"tool_choice": {"type": "function", "name": name},
                                                 "conversation": "none",
                                                 "input": [user("Tokyo time and Oslo weather")]})
            [call] = check_call_events(await collect(conn, "response.done"))
            assert call["name"] == name
        await conn.response.create(response={"tool_choice": "required"})
        calls = check_call_events(await collect(conn, "response.done"))
        assert len(calls) == 1 and calls[0]["name"] in ("get_time", "get_weather")
        # A named function that is not among the tools is refused.
        await conn.response.create(response={"tool_choice": {"type": "function", "name": "nope"}})
        err = (await collect(conn, "error"))[-1]["error"]
        assert err["param"] == "response.tool_choice"


async def test_tool_choice_none_never_calls(server: Server):
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"], "tools": [WEATHER],
                                           "tool_choice": "none", "temperature": 1.0})
        await collect(conn, "session.updated")
        await conn.conversation.item.create(item=user("Call get_weather for Paris. Reply with <tool_call>."))
        for _ in range(3):
            await conn.response.create(response={"max_output_tokens": 40, "conversation": "none",
                                                 "input": [user("Use get_weather for Paris: <tool_call>")]})
            events = await collect(conn, "response.done")
            assert not [e for e in events if "function_call" in e["type"]]
            assert all(o["type"] == "message" for o in events[-1]["response"]["output"])


async def test_unknown_call_id_is_an_error(server: Server):
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await conn.conversation.item.create(item={"type": "function_call_output", "call_id": "call_nope",
                                                  "output": "{}"})
        err = (await collect(conn, "error"))[-1]["error"]
        assert (err["code"], err["param"]) == ("invalid_call_id", "item.call_id")


async def test_tool_round_trip_over_webrtc_in_voice(server: Server):
    """Voice mode over WebRTC: the call makes no audio, the answer after the result is spoken."""
    session = {"type": "realtime", "tools": [WEATHER], "tool_choice": "required",
               "audio": {"input": {"turn_detection": None}}}
    peer, call_id, _created = await open_call(server, "sdp", session)
    try:
        peer.send({"type": "session.update", "session": session})
        updated = (await peer.collect("session.updated"))[-1]["session"]
        assert updated["tools"][0]["name"] == "get_weather"
        speaks = "audio" in updated["output_modalities"]
        peer.send({"type": "conversation.item.create", "item": user("Weather in Paris, please.")})
        peer.send({"type": "response.create"})
        events = await peer.collect("response.done")
        [call] = check_call_events(events)
        assert not [e for e in events if e["type"].startswith(("response.output_audio", "output_audio_buffer"))]
        peer.send({"type": "conversation.item.create", "item": {
            "type": "function_call_output", "call_id": call["call_id"], "output": RESULT}})
        peer.send({"type": "response.create", "response": {"tool_choice": "none", "max_output_tokens": 40}})
        events = await peer.collect("response.done")
        follow = events[-1]["response"]
        assert follow["status"] in ("completed", "incomplete")
        part = follow["output"][0]["content"][0]
        if speaks:
            assert part["type"] == "output_audio" and part["transcript"].strip()
            rest = events + await peer.collect("output_audio_buffer.stopped", wait_s=60)
            assert any(e["type"] == "output_audio_buffer.started" and e["response_id"] == follow["id"] for e in rest)
        else:
            assert part["type"] == "output_text" and part["text"].strip()
    finally:
        await hangup(server, call_id)
        await peer.close()


# A schema no budget can satisfy: guided decoding used to write all 100000 items (and hold the
# shared model meanwhile).
MANY = {"type": "function", "name": "list_things", "description": "List things.",
        "parameters": {"type": "object", "required": ["items"], "properties": {
            "items": {"type": "array", "items": {"type": "string"}, "minItems": 100_000}}}}


async def timed(conn: Any, until: str, timeout: float = 180) -> list[tuple[float, dict]]:
    """Validated server events with their arrival time, up to and including the first `until`."""
    out: list[tuple[float, dict]] = []
    async with asyncio.timeout(timeout):
        async for event in conn:
            data = event.to_dict()
            assert_valid_server_event(data)
            out.append((time.monotonic(), data))
            if data["type"] == until:
                return out
    raise AssertionError(f"connection ended before {until}")


async def test_hostile_schema_is_cut_at_the_budget_and_other_sessions_go_on(server: Server):
    sdk = client(server)
    async with sdk.realtime.connect(model="gpt-realtime") as hostile, \
            sdk.realtime.connect(model="gpt-realtime") as other:
        for conn in (hostile, other):
            await collect(conn, "session.created")
        await hostile.session.update(session={"type": "realtime", "output_modalities": ["text"], "tools": [MANY],
                                              "tool_choice": "required", "max_output_tokens": 300})
        await collect(hostile, "session.updated")
        await other.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                            "max_output_tokens": 16})
        await collect(other, "session.updated")
        await hostile.conversation.item.create(item=user("List every city in the world."))
        await collect(hostile, "conversation.item.done")
        await other.conversation.item.create(item=user("Say hello to Anna."))
        await collect(other, "conversation.item.done")

        await hostile.response.create()
        started = await timed(hostile, "response.function_call_arguments.delta")
        rest = asyncio.create_task(timed(hostile, "response.done"))
        await other.response.create()
        answer = await timed(other, "response.done")
        hostile_events = started + await rest

        # The other session's reply began (and ended) while the hostile one was still being written.
        first_delta = next(t for t, e in answer if e["type"] == "response.output_text.delta")
        hostile_done = hostile_events[-1][0]
        assert first_delta < answer[-1][0] < hostile_done
        assert answer[-1][1]["response"]["status"] in ("completed", "incomplete")
        assert answer[-1][1]["response"]["output"][0]["content"][0]["text"].strip()

        # The hostile reply stopped at its budget and says so; its deltas stayed small.
        response = hostile_events[-1][1]["response"]
        assert response["status"] == "incomplete", response["status_details"]
        assert response["status_details"]["reason"] == "max_output_tokens"
        assert 0 < response["usage"]["output_tokens"] <= 300
        [call] = response["output"]
        assert call["type"] == "function_call" and call["name"] == "list_things" and call["status"] == "incomplete"
        deltas = [e["delta"] for _, e in hostile_events if e["type"] == "response.function_call_arguments.delta"]
        assert "".join(deltas) == call["arguments"] and call["arguments"].startswith('{"items": ["')
        assert len(deltas) <= 300 and max(len(d) for d in deltas) <= MAX_DELTA_CHARS

        # The hostile session itself goes on with a normal turn.
        await hostile.conversation.item.create(item=user("Never mind. Just say ok."))
        await collect(hostile, "conversation.item.done")
        await hostile.response.create(response={"tool_choice": "none", "max_output_tokens": 20})
        follow = (await collect(hostile, "response.done"))[-1]["response"]
        assert follow["status"] in ("completed", "incomplete")
        assert [o["type"] for o in follow["output"]] == ["message"]
        assert follow["output"][0]["content"][0]["text"].strip()


# ----------------------------------------------------------------------------- context and limits


# Text-only servers; one LLM thread, so prompt re-evaluation after each cut does not depend on
# having both cores free.
LEAN = {"OPENREALTIME_STT_ENABLED": "false", "OPENREALTIME_TTS_ENABLED": "false",
        "OPENREALTIME_VAD_ENABLED": "false", "OPENREALTIME_TURN_DETECTOR_ENABLED": "false",
        "OPENREALTIME_LLM_THREADS": "1"}


@pytest.fixture(scope="module")
def small_server() -> Iterator[Server]:
    srv = start_server({**LEAN, "OPENREALTIME_LLM_CONTEXT": "512"}, name="small-context")
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log_text()


@pytest.fixture(scope="module")
def limited_server() -> Iterator[Server]:
    srv = start_server({**LEAN, "OPENREALTIME_RATE_LIMIT_REQUESTS_PER_MIN": "2",
                        "OPENREALTIME_RATE_LIMIT_TOKENS_PER_MIN": "100000"}, name="rate-limited")
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log_text()


async def test_long_conversation_keeps_working_under_auto_truncation(small_server: Server):
    filler = ("Here is some background about my day, which was long and full of small events, meetings, "
              "emails, phone calls and errands around town. ")
    async with client(small_server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                           "instructions": "SYSTEM-MARKER: be brief.", "max_output_tokens": 32,
                                           "tools": [WEATHER]})
        await collect(conn, "session.updated")
        inputs = []
        for turn in range(10):
            await conn.conversation.item.create(item=user(f"Turn {turn}. {filler * 2}"))
            await conn.response.create()
            response = (await collect(conn, "response.done", timeout=120))[-1]["response"]
            assert response["status"] in ("completed", "incomplete"), response
            inputs.append(response["usage"]["input_tokens"])
            assert response["usage"]["input_tokens"] + response["usage"]["output_tokens"] <= 512
        assert max(inputs) > 300  # the context really filled up, and kept working after that
        # Every item is still in the client's view of the conversation.
        await conn.conversation.item.retrieve(item_id=response["output"][0]["id"])
        assert (await collect(conn, "conversation.item.retrieved"))[-1]["item"]["id"] == response["output"][0]["id"]


async def test_disabled_truncation_fails_clearly(small_server: Server):
    async with client(small_server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                           "truncation": "disabled", "max_output_tokens": 16})
        await collect(conn, "session.updated")
        await conn.conversation.item.create(item=user("word " * 600))
        await conn.response.create()
        response = (await collect(conn, "response.done"))[-1]["response"]
        assert response["status"] == "failed"
        error = response["status_details"]["error"]
        assert error["code"] == "context_length_exceeded" and "truncation is disabled" in error["message"]
        # Retention-ratio truncation makes the same conversation work.
        await conn.session.update(session={"type": "realtime", "truncation": {
            "type": "retention_ratio", "retention_ratio": 0.5}})
        await conn.conversation.item.create(item=user("Now a short question: how are you?"))
        await conn.response.create()
        response = (await collect(conn, "response.done"))[-1]["response"]
        assert response["status"] in ("completed", "incomplete")


async def test_rate_limits(limited_server: Server):
    async with client(limited_server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                           "max_output_tokens": 4})
        await collect(conn, "session.updated")
        await conn.response.create()
        await collect(conn, "response.done")
        limits = (await collect(conn, "rate_limits.updated"))[-1]["rate_limits"]
        by_name = {x["name"]: x for x in limits}
        assert by_name["requests"]["limit"] == 2 and by_name["requests"]["remaining"] == 1
        assert by_name["tokens"]["limit"] == 100000 and by_name["tokens"]["remaining"] < 100000
        assert by_name["requests"]["reset_seconds"] > 0
    # The limit is per key, across sessions: a second connection has one request left.
    async with client(limited_server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await conn.response.create(response={"output_modalities": ["text"], "max_output_tokens": 4})
        await collect(conn, "response.done")
        await conn.response.create(response={"output_modalities": ["text"], "max_output_tokens": 4})
        err = (await collect(conn, "error"))[-1]["error"]
        assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests"
        # Not a dropped session: it still answers.
        await conn.session.update(session={"type": "realtime", "instructions": "still here"})
        assert (await collect(conn, "session.updated"))[-1]["session"]["instructions"] == "still here"
    # Ephemeral keys minted with the key share its limits: minting more is no way around them.
    async with client(limited_server) as sdk:
        secret = await sdk.realtime.client_secrets.create(session={"type": "realtime"})  # type: ignore[arg-type]
    async with client(limited_server, secret.value).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await conn.response.create(response={"output_modalities": ["text"], "max_output_tokens": 4})
        err = (await collect(conn, "error"))[-1]["error"]
        assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests"


async def test_unlimited_server_reports_no_limits(server: Server):
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await conn.response.create(response={"output_modalities": ["text"], "max_output_tokens": 2})
        await collect(conn, "response.done")
        assert (await collect(conn, "rate_limits.updated"))[-1]["rate_limits"] == []
        await asyncio.sleep(0)
