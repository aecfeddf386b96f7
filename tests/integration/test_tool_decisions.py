"""Deciding to call under tool_choice "auto", on the default model (Qwen2.5-1.5B).

Requests that need a tool get a call, the others a spoken answer with no call syntax (a call the
model invents is taken back); two requests
get two calls (one with parallel_tool_calls false); after a tool result the reply answers from it
and never repeats the answered call. Seeded, so a run is reproducible.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from openrealtime.backends.gguf import ModelError, ensure_model
from openrealtime.backends.llamacpp import LlamaCppBackend
from openrealtime.backends.llm import (
    ChatMessage,
    Finished,
    GenerationParams,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
)
from openrealtime.config import Settings

WEATHER = ToolSpec("get_weather", "Get the current weather and temperature for a city.", {
    "type": "object", "properties": {"city": {"type": "string"},
                                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"]})
ORDER = ToolSpec("lookup_order", "Look up the status of a customer's order by its order number.", {
    "type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]})
CONVERT = ToolSpec("convert_units", "Convert a quantity from one unit to another.", {
    "type": "object", "properties": {"value": {"type": "number"}, "from_unit": {"type": "string"},
                                     "to_unit": {"type": "string"}},
    "required": ["value", "from_unit", "to_unit"]})
CALENDAR = ToolSpec("create_calendar_event", "Add an event to the user's calendar.", {
    "type": "object", "properties": {"title": {"type": "string"}, "date": {"type": "string"},
                                     "time": {"type": "string"}}, "required": ["title", "date", "time"]})
SEARCH = ToolSpec("web_search", "Search the web for current information, news, prices or facts you do not know.", {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]})
TOOLS = [WEATHER, CALENDAR, SEARCH, ORDER, CONVERT]
SYSTEM = ChatMessage("system", Settings().default_instructions)
CALL_SYNTAX = ("{", "}", "<tool_call>", "```", "get_weather", "lookup_order", "convert_units")


@pytest.fixture(scope="module")
async def qwen(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LlamaCppBackend]:
    try:
        path: Path = ensure_model("qwen2.5-1.5b", Settings().model_cache_dir, progress=False)
    except ModelError as exc:
        pytest.skip(f"qwen2.5-1.5b is not installed: {exc}")
    llm = LlamaCppBackend(path, n_ctx=2048, name="qwen2.5-1.5b", n_parallel=2)
    yield llm
    await llm.close()


async def reply(llm: LlamaCppBackend, messages: list[ChatMessage],
                **params: object) -> tuple[str, list[tuple[str, dict]], str]:
    """(text, [(name, arguments)], finish reason) of one seeded reply under auto."""
    text, calls, finish = "", {}, ""
    gen = GenerationParams(**{"tools": TOOLS, "tool_choice": "auto", "seed": 1, "max_tokens": 80,  # type: ignore[arg-type]
                              "cache_key": "t", **params})
    async for event in llm.stream([SYSTEM, *messages], gen):
        if isinstance(event, TextDelta):
            text += event.text
        elif isinstance(event, ToolCallDelta):
            call = calls.setdefault(event.index, ["", ""])
            call[0] = event.name or call[0]
            call[1] += event.arguments
        elif isinstance(event, Finished):
            finish = event.finish_reason
    return text, [(name, json.loads(args)) for name, args in calls.values()], finish


@pytest.mark.parametrize(("request_", "name", "word"), [
    ("What's the weather in Paris?", "get_weather", "paris"),
    ("Can you check the status of order number 77120?", "lookup_order", "77120"),
    ("Convert 10 miles to kilometers.", "convert_units", "mile"),
])
async def test_a_request_a_tool_serves_gets_a_call(qwen: LlamaCppBackend, request_: str, name: str, word: str):
    text, calls, finish = await reply(qwen, [ChatMessage("user", request_)])
    assert text == "" and finish == "tool_calls", (text, calls)
    assert len(calls) == 1 and calls[0][0] == name and word in json.dumps(calls[0][1]).lower(), calls


# "ephemeral" leads the model to invent a call (lookup_order "12345": it fails without the check),
# which is taken back: its values come from nowhere in the conversation.
@pytest.mark.parametrize("request_", ["Tell me a short joke.", "What is the capital of Italy?",
                                      "Hello! How are you today?", "What does the word 'ephemeral' mean?"])
async def test_a_request_no_tool_serves_gets_words(qwen: LlamaCppBackend, request_: str):
    text, calls, finish = await reply(qwen, [ChatMessage("user", request_)])
    assert calls == [] and finish == "stop" and text.strip(), (text, calls)
    assert not any(s in text for s in CALL_SYNTAX), text


async def test_two_requests_get_two_calls_unless_parallel_calls_are_off(qwen: LlamaCppBackend):
    ask = [ChatMessage("user", "Check the status of orders 11111 and 22222.")]
    _, calls, _ = await reply(qwen, ask)
    assert [(n, a["order_id"]) for n, a in calls] == [("lookup_order", "11111"), ("lookup_order", "22222")], calls
    _, calls, finish = await reply(qwen, ask, parallel_tool_calls=False)
    assert [n for n, _ in calls] == ["lookup_order"] and finish == "tool_calls", calls


@pytest.mark.parametrize(("request_", "call", "output", "answer"), [
    ("What's the weather in Paris?", ("get_weather", {"city": "Paris"}),
     '{"city": "Paris", "temperature_c": 18, "condition": "sunny"}', "18"),
    ("Where is my order 48213?", ("lookup_order", {"order_id": "48213"}),
     '{"order_id": "48213", "status": "shipped", "carrier": "DHL", "eta": "Thursday"}', "thursday"),
    ("Convert 10 miles to kilometers.", ("convert_units", {"value": 10, "from_unit": "miles", "to_unit": "kilometers"}),
     '{"result": 16.09, "unit": "kilometers"}', "16"),
])
async def test_after_a_tool_result_the_reply_answers_from_it(qwen: LlamaCppBackend, request_: str,
                                                            call: tuple[str, dict], output: str, answer: str):
    history = [ChatMessage("user", request_),
               ChatMessage("assistant", "", tool_calls=[ToolCall("call_1", call[0], json.dumps(call[1]))]),
               ChatMessage("tool", output, tool_call_id="call_1")]
    text, calls, _ = await reply(qwen, history)
    assert (call[0], call[1]) not in calls, calls  # never the answered call again
    assert text.strip() and answer in text.lower(), text
    assert not any(s in text for s in CALL_SYNTAX), text


async def test_a_text_reply_never_spells_out_a_function_name(qwen: LlamaCppBackend):
    # Asked to, the model would write the names verbatim (it does with NameGuard switched off);
    # spoken, they are machine text.
    text, calls, _ = await reply(qwen, [ChatMessage("user", "Repeat exactly, nothing else: get_weather, lookup_order")],
                                 tool_choice="none")
    assert calls == [] and text.strip(), text
    assert "get_weather" not in text.lower() and "lookup_order" not in text.lower(), text
