"""Function calling, truncation and rate limits in the engine, against scripted LLMs."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest

from openrealtime.backends.llm import (
    ChatMessage,
    Finished,
    GenerationParams,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from openrealtime.engine import EngineContext, RealtimeSession
from openrealtime.engine.ratelimit import RateLimiter
from openrealtime.engine.truncation import ContextWindow, reply_reserve
from openrealtime.protocol.items import ContentPart, Item
from openrealtime.protocol.session import RetentionRatio

from .test_engine import drain, send, user_text
from .test_voice_engine import ToneTTS

WEATHER = {
    "type": "function", "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location", "unit"]},
}
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}


def call(index: int, name: str, args: str, pieces: int = 3) -> list:
    """A streamed call: the name first, then the arguments in `pieces` chunks."""
    step = max(1, len(args) // pieces)
    out: list = [ToolCallDelta(index=index, call_id=f"call_{name}_{index}", name=name)]
    out += [ToolCallDelta(index=index, arguments=args[i:i + step]) for i in range(0, len(args), step)]
    return out


class ToolLLM:
    """Plays back scripted event lists, one per request; records prompts and params."""

    name = "tool-llm"

    def __init__(self, scripts: list[list], context_length: int = 4096):
        self.scripts = scripts
        self.context_length = context_length
        self.prompts: list[list[ChatMessage]] = []
        self.params: list[GenerationParams] = []

    async def stream(self, messages: list[ChatMessage], params: GenerationParams) -> AsyncIterator:
        self.prompts.append(messages)
        self.params.append(params)
        script = self.scripts[min(len(self.params) - 1, len(self.scripts) - 1)]
        n = 0
        reason = "stop"
        for event in script:
            await asyncio.sleep(0)
            n += 1
            if isinstance(event, ToolCallDelta):
                reason = "tool_calls"
            yield event
        yield Finished(reason, Usage(await self.count_tokens(messages), n, 0))  # type: ignore[arg-type]

    async def count_tokens(self, messages: list[ChatMessage], tools: object = None) -> int:
        """One token per word, plus 2 per message (a stand-in tokenizer and template)."""
        total = 0
        for m in messages:
            total += 2 + len(m.content.split())
            for c in m.tool_calls or []:
                total += 1 + len(c.arguments.split())
        return total

    async def close(self) -> None:
        pass


def make_session(llm, *, tts=None, limiter: RateLimiter | None = None, api_key: str | None = None,
                 **kw) -> RealtimeSession:
    async def resolve(model: str | None):
        return llm

    ctx = EngineContext(resolve_llm=resolve, default_model="m", default_instructions="Be brief.", tts=tts,
                        rate_limiter=limiter)
    return RealtimeSession(ctx, transport="websocket", api_key=api_key, **kw)


async def started(s: RealtimeSession, session: dict | None = None) -> None:
    await s.start()
    await drain(s)
    if session:
        await send(s, {"type": "session.update", "session": session})
        [updated] = await drain(s)
        assert updated["type"] == "session.updated", updated


async def test_tool_only_response_events_and_follow_up():
    args = '{"location": "Paris", "unit": "celsius"}'
    llm = ToolLLM([call(0, "get_weather", args), [TextDelta("It is 23 degrees.")]])
    s = make_session(llm)
    await started(s, {"output_modalities": ["text"], "tools": [WEATHER], "tool_choice": "required"})
    await send(s, user_text("Weather in Paris?"))
    await drain(s)
    await send(s, {"type": "response.create"})
    events = await drain(s, "response.done")
    types = [e["type"] for e in events]
    assert types == [
        "response.created", "response.output_item.added", "conversation.item.added",
        *["response.function_call_arguments.delta"] * (len(types) - 7),
        "response.function_call_arguments.done", "response.output_item.done", "conversation.item.done",
        "response.done",
    ]
    added = events[1]["item"]
    assert added["type"] == "function_call" and added["status"] == "in_progress"
    assert added["arguments"] == "" and added["name"] == "get_weather" and added["call_id"] == "call_get_weather_0"
    assert "content" not in added
    deltas = [e for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert "".join(e["delta"] for e in deltas) == args
    assert all(e["output_index"] == 0 and e["call_id"] == "call_get_weather_0" for e in deltas)
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert (done["name"], done["arguments"], done["item_id"]) == ("get_weather", args, added["id"])
    response = events[-1]["response"]
    assert response["status"] == "completed" and len(response["output"]) == 1
    assert response["output"][0]["status"] == "completed" and response["output"][0]["arguments"] == args
    assert llm.params[0].tool_choice == "required"
    assert [t.name for t in llm.params[0].tools] == ["get_weather"]
    assert llm.params[0].tools[0].parameters == WEATHER["parameters"]

    # The client runs the function and answers; the next prompt carries the call and its result.
    await send(s, {"type": "conversation.item.create", "item": {
        "type": "function_call_output", "call_id": "call_get_weather_0", "output": '{"temp_c": 23}'}})
    await drain(s)
    await send(s, {"type": "response.create", "response": {"tool_choice": "auto", "parallel_tool_calls": False}})
    events = await drain(s, "response.done")
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "It is 23 degrees."
    prompt = llm.prompts[1]
    assert [m.role for m in prompt] == ["system", "user", "assistant", "tool"]
    assert prompt[2].tool_calls[0].id == "call_get_weather_0" and prompt[2].tool_calls[0].arguments == args
    assert (prompt[3].tool_call_id, prompt[3].content) == ("call_get_weather_0", '{"temp_c": 23}')
    # Per-response tool_choice and parallel_tool_calls applied to that response only.
    assert llm.params[1].tool_choice == "auto" and llm.params[1].parallel_tool_calls is False
    assert llm.params[0].parallel_tool_calls is None
    await s.close()


async def test_text_then_two_calls_have_the_right_output_indices():
    script = [TextDelta("Let me "), TextDelta("check."), *call(0, "get_weather", '{"location": "Oslo", '
                                                                 '"unit": "celsius"}'),
              *call(1, "get_time", "{}", pieces=1)]
    llm = ToolLLM([script])
    s = make_session(llm)
    await started(s, {"output_modalities": ["text"], "tools": [WEATHER, TIME]})
    await send(s, user_text("Weather and time in Oslo?"))
    await drain(s)
    await send(s, {"type": "response.create"})
    events = await drain(s, "response.done")
    outputs = events[-1]["response"]["output"]
    assert [o["type"] for o in outputs] == ["message", "function_call", "function_call"]
    assert outputs[0]["content"][0]["text"] == "Let me check."
    # The message is done before the first call starts; each call is done before the next.
    types = [e["type"] for e in events]
    assert types.index("response.output_text.done") < [
        i for i, e in enumerate(events) if e["type"] == "response.output_item.added"][1]
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [e["output_index"] for e in added] == [0, 1, 2]
    for e in events:
        if e["type"].startswith("response.function_call_arguments"):
            assert e["output_index"] == (1 if e["call_id"] == "call_get_weather_0" else 2)
    item_done = [e for e in events if e["type"] == "response.output_item.done"]
    assert [e["output_index"] for e in item_done] == [0, 1, 2]
    # The conversation order follows the output; a run of calls reads as one assistant turn.
    assert [it.type for it in s.conversation][-3:] == ["message", "function_call", "function_call"]
    await send(s, {"type": "conversation.item.create", "item": {
        "type": "function_call_output", "call_id": "call_get_weather_0", "output": "sunny"}})
    await send(s, {"type": "conversation.item.create", "item": {
        "type": "function_call_output", "call_id": "call_get_time_1", "output": "noon"}})
    await send(s, {"type": "response.create"})
    await drain(s, "response.done")
    prompt = llm.prompts[1]
    assert [m.role for m in prompt] == ["system", "user", "assistant", "tool", "tool"]
    assert prompt[2].content == "Let me check." and [c.name for c in prompt[2].tool_calls] == ["get_weather",
                                                                                                "get_time"]
    await s.close()


async def test_voice_tool_call_has_no_audio_and_the_answer_is_spoken():
    llm = ToolLLM([call(0, "get_weather", '{"location": "Rome", "unit": "celsius"}'),
                   [TextDelta("Sunny and warm.")]])
    s = make_session(llm, tts=ToneTTS())
    await started(s, {"tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}})
    await send(s, user_text("Weather in Rome?"))
    await drain(s)
    await send(s, {"type": "response.create"})
    events = await drain(s, "response.done")
    types = {e["type"] for e in events}
    assert not {"response.output_audio.delta", "response.content_part.added",
                "response.output_audio_transcript.delta"} & types
    assert events[-1]["response"]["output"][0]["type"] == "function_call"
    assert llm.params[0].tool_choice == "get_weather"
    call_id = events[-1]["response"]["output"][0]["call_id"]
    await send(s, {"type": "conversation.item.create", "item": {
        "type": "function_call_output", "call_id": call_id, "output": "sunny, 25C"}})
    await send(s, {"type": "response.create"})
    events = await drain(s, "response.done")
    assert any(e["type"] == "response.output_audio.delta" for e in events)
    assert events[-1]["response"]["output"][0]["content"][0]["transcript"] == "Sunny and warm."
    await s.close()


@pytest.mark.parametrize(("update", "response", "param"), [
    ({"tools": [WEATHER]}, {"tool_choice": {"type": "function", "name": "nope"}}, "response.tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}}, {"tools": [TIME]},
     "session.tool_choice"),
    ({}, {"tool_choice": "required"}, "response.tool_choice"),
])
async def test_impossible_tool_choice_is_an_error(update, response, param):
    llm = ToolLLM([[TextDelta("ok")]])
    s = make_session(llm)
    await started(s, {"output_modalities": ["text"], **update})
    await send(s, {"type": "response.create", "event_id": "rc", "response": response})
    [err] = await drain(s)
    assert err["type"] == "error" and err["error"]["param"] == param and err["error"]["event_id"] == "rc"
    assert not llm.params  # no response was started
    await send(s, {"type": "response.create"})
    assert (await drain(s, "response.done"))[-1]["response"]["status"] == "completed"
    await s.close()


async def test_tool_choice_none_and_per_response_overrides_apply_once():
    llm = ToolLLM([[TextDelta("a")]])
    s = make_session(llm)
    await started(s, {"output_modalities": ["text"], "tools": [WEATHER], "temperature": 0.7})
    await send(s, user_text("Hi"))
    await send(s, {"type": "response.create", "response": {
        "tool_choice": "none", "instructions": "Pirate.", "temperature": 1.1, "tools": [TIME],
        "max_output_tokens": 7, "metadata": {"k": "v"}}})
    first = (await drain(s, "response.done"))[-1]["response"]
    await send(s, {"type": "response.create"})
    second = (await drain(s, "response.done"))[-1]["response"]
    p1, p2 = llm.params
    assert (p1.tool_choice, [t.name for t in p1.tools], p1.temperature, p1.max_tokens) == ("none", ["get_time"],
                                                                                           1.1, 7)
    assert (p2.tool_choice, [t.name for t in p2.tools], p2.temperature, p2.max_tokens) == ("auto",
                                                                                           ["get_weather"], 0.7,
                                                                                           None)
    assert llm.prompts[0][0].content == "Pirate." and llm.prompts[1][0].content == "Be brief."
    assert first["metadata"] == {"k": "v"} and second["metadata"] is None
    assert first["max_output_tokens"] == 7 and second["max_output_tokens"] == "inf"
    await s.close()


async def test_unknown_call_id_is_an_error():
    s = make_session(ToolLLM([[TextDelta("a")]]))
    await started(s)
    await send(s, {"type": "conversation.item.create", "event_id": "x", "item": {
        "type": "function_call_output", "call_id": "call_nope", "output": "{}"}})
    [err] = await drain(s)
    assert (err["error"]["code"], err["error"]["param"], err["error"]["event_id"]) == (
        "invalid_call_id", "item.call_id", "x")


# ---------------------------------------------------------------------------- truncation


async def long_conversation(s: RealtimeSession, turns: int, words: int = 20) -> None:
    for i in range(turns):
        await send(s, user_text(f"turn{i} " + "word " * words))
        await send(s, {"type": "response.create"})
        done = (await drain(s, "response.done"))[-1]["response"]
        assert done["status"] == "completed", done


async def test_auto_truncation_keeps_instructions_and_fits():
    llm = ToolLLM([[TextDelta("reply " * 10)]], context_length=200)
    s = make_session(llm)
    await started(s, {"output_modalities": ["text"], "max_output_tokens": 20})
    await long_conversation(s, 12)
    assert len(s.conversation) == 24  # the client's view keeps everything
    for prompt in llm.prompts:
        assert prompt[0].role == "system" and prompt[0].content == "Be brief."
        assert await llm.count_tokens(prompt) <= 200 - 20
    last = llm.prompts[-1]
    assert last[-1].content.startswith("turn11") and not any(m.content.startswith("turn0 ") for m in last)
    assert s.context_window.dropped


async def test_retention_ratio_truncates_rarely_and_keeps_a_stable_prefix():
    llm = ToolLLM([[TextDelta("ok")]], context_length=400)
    s = make_session(llm)
    await started(s, {"output_modalities": ["text"], "max_output_tokens": 50,
                      "truncation": {"type": "retention_ratio", "retention_ratio": 0.5}})
    await long_conversation(s, 20)
    firsts = [p[1].content.split()[0] for p in llm.prompts]
    changes = sum(1 for a, b in itertools.pairwise(firsts) if a != b)
    assert changes >= 1
    # After a cut the conversation is at most half its budget, so the next cuts are several turns away.
    assert changes <= 4, firsts
    for prompt in llm.prompts:
        assert await llm.count_tokens(prompt) <= 400 - 50


async def test_post_instructions_limit_triggers_truncation():
    llm = ToolLLM([[TextDelta("ok")]], context_length=4096)
    s = make_session(llm)
    await started(s, {"output_modalities": ["text"], "truncation": {
        "type": "retention_ratio", "retention_ratio": 0.8, "token_limits": {"post_instructions": 60}}})
    await long_conversation(s, 6)
    system = await llm.count_tokens(llm.prompts[-1][:1])
    assert await llm.count_tokens(llm.prompts[-1]) - system <= 60


async def test_disabled_truncation_fails_with_context_length_exceeded():
    llm = ToolLLM([[TextDelta("ok")]], context_length=120)
    s = make_session(llm)
    await started(s, {"output_modalities": ["text"], "truncation": "disabled", "max_output_tokens": 20})
    await send(s, user_text("word " * 30))
    await send(s, {"type": "response.create"})
    assert (await drain(s, "response.done"))[-1]["response"]["status"] == "completed"
    await send(s, user_text("word " * 80))
    await send(s, {"type": "response.create"})
    done = (await drain(s, "response.done"))[-1]["response"]
    assert done["status"] == "failed" and done["output"] == []
    error = done["status_details"]["error"]
    assert error["code"] == "context_length_exceeded" and "truncation is disabled" in error["message"]
    # The session goes on: switching truncation on makes it fit again.
    await send(s, {"type": "session.update", "session": {"truncation": "auto"}})
    await send(s, {"type": "response.create"})
    assert (await drain(s, "response.done"))[-1]["response"]["status"] == "completed"


async def test_truncation_drops_a_call_with_its_output():
    window = ContextWindow()

    def item(kind: str, **kw) -> Item:
        if kind == "user":
            return Item(id=kw["id"], type="message", role="user",
                        content=[ContentPart(type="input_text", text=kw["text"])])
        return Item(type=kind, **kw)

    items = [item("user", id="u1", text="w " * 30),
             item("function_call", id="c1", call_id="k1", name="f", arguments="{}"),
             item("function_call_output", id="o1", call_id="k1", output="x " * 30),
             item("user", id="u2", text="w " * 10)]
    llm = ToolLLM([[]])

    def build(its):
        from openrealtime.engine.response import items_to_messages
        return [ChatMessage("system", "sys"), *items_to_messages(list(its))]

    fitted = await window.fit(items, build=build, count=llm.count_tokens, context_length=60, reserve=10,
                              truncation="auto")
    assert [m.role for m in fitted.messages] == ["system", "user"]
    assert set(fitted.dropped) == {"u1", "c1", "o1"} and fitted.prompt_tokens <= 50
    assert reply_reserve("inf", 512) == 128 and reply_reserve(40, 512) == 40
    ratio = RetentionRatio(type="retention_ratio", retention_ratio=0.5)
    again = await window.fit(items, build=build, count=llm.count_tokens, context_length=60, reserve=10,
                             truncation=ratio)
    assert [m.role for m in again.messages] == ["system", "user"]  # remembered: u1/c1/o1 stay out


# ---------------------------------------------------------------------------- rate limits


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rate_limiter_buckets_refill_and_report():
    clock = Clock()
    rl = RateLimiter(requests_per_min=2, tokens_per_min=100, clock=clock)
    assert rl.try_start("k") is None and rl.try_start("k") is None
    refused = rl.try_start("k")
    assert refused is not None and refused.name == "requests" and refused.retry_after_s == 30.0
    assert rl.try_start("other") is None  # per key
    clock.t += 30
    assert rl.try_start("k") is None
    rl.add_tokens("k", 150)
    snap = {x["name"]: x for x in rl.snapshot("k")}
    assert snap["tokens"]["remaining"] == 0 and snap["tokens"]["reset_seconds"] == pytest.approx(90.0)
    assert snap["requests"]["limit"] == 2 and snap["requests"]["remaining"] == 0
    clock.t += 30
    refused = rl.try_start("k")
    assert refused is not None and refused.name == "tokens" and "TPM" in refused.message
    clock.t += 60
    assert rl.try_start("k") is None
    assert RateLimiter().snapshot("k") == [] and RateLimiter().try_start("k") is None
    assert RateLimiter.identity("secret") != "secret"


async def test_rate_limits_in_the_session():
    clock = Clock()
    limiter = RateLimiter(requests_per_min=2, tokens_per_min=None, clock=clock)
    llm = ToolLLM([[TextDelta("ok")]])
    s = make_session(llm, limiter=limiter, api_key="sk-a")
    other = make_session(llm, limiter=limiter, api_key="sk-a")  # same key: same buckets
    await started(s, {"output_modalities": ["text"]})
    await started(other, {"output_modalities": ["text"]})
    await send(s, {"type": "response.create"})
    events = await drain(s, "response.done")
    [update] = await drain(s)
    assert update["type"] == "rate_limits.updated"
    assert update["rate_limits"] == [{"name": "requests", "limit": 2, "remaining": 1, "reset_seconds": 30.0}]
    await send(other, {"type": "response.create"})
    await drain(other, "rate_limits.updated")
    await send(s, {"type": "response.create", "event_id": "again"})
    [err] = await drain(s)
    assert err["error"]["code"] == "rate_limit_exceeded" and err["error"]["type"] == "requests"
    assert err["error"]["event_id"] == "again"
    assert len(events) > 2 and not s.closed  # the session goes on
    clock.t += 31
    await send(s, {"type": "response.create"})
    assert (await drain(s, "response.done"))[-1]["response"]["status"] == "completed"
    await s.close()
    await other.close()

