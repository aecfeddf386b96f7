"""Token budgets and fairness of the shared llama.cpp model, against the real SmolLM2-135M.

A tool schema can ask for more than any budget (``minItems: 100000``, ``minLength: 10000000``):
the reply must stop at the budget, stream in small deltas, and not keep other sessions waiting.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import jsonschema
import pytest

from openrealtime.backends.llamacpp import LlamaCppBackend
from openrealtime.backends.llm import (
    ChatMessage,
    Finished,
    GenerationParams,
    LLMEvent,
    TextDelta,
    ToolCallDelta,
    ToolSpec,
)
from openrealtime.backends.tool_calling import BUDGET_MARGIN, CALL_PREFIX, MAX_DELTA_CHARS, TOOL_CALL_OPEN

from .conftest import require_smollm2

require_smollm2()

MANY = ToolSpec("list_things", "List things.", {
    "type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": 100_000}},
    "required": ["items"]})
LONG = ToolSpec("write_text", "Write a text.", {
    "type": "object", "properties": {"text": {"type": "string", "minLength": 10_000_000}}, "required": ["text"]})
BOOKING = ToolSpec("book_table", "Book a restaurant table.", {
    "type": "object",
    "properties": {"restaurant": {"type": "string", "maxLength": 40},
                   "guests": {"type": "integer", "minimum": 1, "maximum": 12},
                   "when": {"type": "object", "properties": {"day": {"type": "string"}, "hour": {"type": "integer"}},
                            "required": ["day", "hour"]},
                   "notes": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
    "required": ["restaurant", "guests", "when"]})
# The shortest valid call of BOOKING, as the model's context reads it.
BOOKING_MINIMAL = (TOOL_CALL_OPEN + CALL_PREFIX + 'book_table", "arguments": '
                   '{"restaurant": "", "guests": 1, "when": {"day": "", "hour": 0}}')


def ask(text: str) -> list[ChatMessage]:
    return [ChatMessage("system", "You are a helpful assistant."), ChatMessage("user", text)]


@pytest.fixture(scope="module")
async def llm(model_path: Path) -> AsyncIterator[LlamaCppBackend]:
    backend = await asyncio.to_thread(LlamaCppBackend, model_path, n_ctx=2048, n_threads=1, name="smollm2-135m")
    yield backend
    await backend.close()


async def collect(llm: LlamaCppBackend, messages: list[ChatMessage], params: GenerationParams,
                  log: list[tuple[str, LLMEvent]] | None = None, tag: str = "") -> tuple[list[LLMEvent], Finished]:
    events: list[LLMEvent] = []
    async for event in llm.stream(messages, params):
        events.append(event)
        if log is not None:
            log.append((tag, event))
    assert isinstance(events[-1], Finished)
    return events, events[-1]


def arguments(events: list[LLMEvent]) -> tuple[str, list[str]]:
    deltas = [e.arguments for e in events if isinstance(e, ToolCallDelta) and e.arguments]
    return "".join(deltas), deltas


def hostile(max_tokens: int | None, tool: ToolSpec = MANY) -> GenerationParams:
    return GenerationParams(temperature=0.0, max_tokens=max_tokens, tools=[tool], tool_choice="required")


async def test_min_items_beyond_the_budget_ends_at_the_budget(llm: LlamaCppBackend):
    events, finished = await collect(llm, ask("List every city you know."), hostile(64))
    assert finished.finish_reason == "length"
    assert finished.usage.completion_tokens <= 64
    args, deltas = arguments(events)
    assert args.startswith('{"items": ["') and len(deltas) <= 64
    assert max(len(d) for d in deltas) <= MAX_DELTA_CHARS
    assert [e.name for e in events if isinstance(e, ToolCallDelta) and e.name] == ["list_things"]


async def test_min_length_beyond_the_budget_streams_small_deltas(llm: LlamaCppBackend):
    events, finished = await collect(llm, ask("Write a short note."), hostile(64, LONG))
    assert finished.finish_reason == "length" and finished.usage.completion_tokens <= 64
    args, deltas = arguments(events)
    assert args.startswith('{"text": "') and len(args) < 64 * 64
    assert max(len(d) for d in deltas) <= MAX_DELTA_CHARS


async def test_no_max_tokens_uses_the_server_cap_and_the_context(model_path: Path):
    capped = await asyncio.to_thread(LlamaCppBackend, model_path, n_ctx=512, n_threads=1, max_output_tokens=48)
    try:
        _, finished = await collect(capped, ask("List every city you know."), hostile(None))
        assert finished.finish_reason == "length" and finished.usage.completion_tokens == 48
        # A long prompt leaves less than the cap: the context is the bound.
        filler = "Here is some background about cities and towns, large and small, old and new. "
        messages = ask("List them.")
        while await capped.count_tokens(messages, [MANY]) < capped.context_length - 30:
            messages = ask(filler + messages[1].content)
        _, finished = await collect(capped, messages, hostile(None))
        assert finished.finish_reason == "length"
        assert 0 < finished.usage.completion_tokens < 48
        assert finished.usage.prompt_tokens + finished.usage.completion_tokens == capped.context_length
    finally:
        await capped.close()


async def test_tight_budget_gives_a_complete_valid_call_or_a_cut_one(llm: LlamaCppBackend):
    need = len(llm._tokenize(BOOKING_MINIMAL, add_bos=False))
    params = GenerationParams(temperature=0.9, max_tokens=need + BUDGET_MARGIN, tools=[BOOKING],
                              tool_choice="book_table")
    for seed in range(3):
        params.seed = seed
        events, finished = await collect(llm, ask("Book a table for four at Luigi's tomorrow at 8pm."), params)
        assert finished.finish_reason == "tool_calls"
        assert finished.usage.completion_tokens <= need + BUDGET_MARGIN
        jsonschema.validate(json.loads(arguments(events)[0]), BOOKING.parameters)
    # One token short of the shortest call: cut where the budget ends, reported as incomplete.
    params.max_tokens = need - 1
    events, finished = await collect(llm, ask("Book a table."), params)
    assert finished.finish_reason == "length" and finished.usage.completion_tokens <= need - 1
    with pytest.raises(ValueError):
        json.loads(arguments(events)[0])


async def test_a_long_request_does_not_hold_back_another_first_token(llm: LlamaCppBackend):
    """Two concurrent requests: a hostile long one first, then a short one. The short one's first
    token arrives (and it finishes) before the long one ends, they shared decode steps, and the
    long one's output is the same as when it runs alone."""
    long_messages = ask("List all the things you know.")
    short_params = GenerationParams(temperature=0.0, max_tokens=12)
    await collect(llm, ask("Unrelated warm-up."), short_params)
    alone, _ = await collect(llm, long_messages, hostile(300))
    await collect(llm, ask("Unrelated warm-up."), short_params)  # the same cache state as before `alone`

    log: list[tuple[str, LLMEvent]] = []
    started = asyncio.Event()
    steps = dict(llm.cache)

    async def long_one() -> list[LLMEvent]:
        events: list[LLMEvent] = []
        async for event in llm.stream(long_messages, hostile(300)):
            events.append(event)
            log.append(("long", event))
            if isinstance(event, ToolCallDelta) and event.arguments:
                started.set()
        return events

    async def short_one() -> None:
        await started.wait()
        await collect(llm, ask("Say hello to Anna."), short_params, log, "short")

    shared, _ = await asyncio.gather(long_one(), short_one())
    order = [(tag, type(e)) for tag, e in log]
    first_short = next(i for i, (tag, kind) in enumerate(order) if tag == "short" and kind is TextDelta)
    short_done = order.index(("short", Finished))
    long_done = order.index(("long", Finished))
    assert first_short < short_done < long_done
    assert any(tag == "long" for tag, _ in order[short_done:long_done])  # the long one went on afterwards
    # Batched: some steps carried both sequences (more sequences than steps over the run).
    assert llm.cache["sequences"] - steps["sequences"] > llm.cache["steps"] - steps["steps"]
    assert arguments(shared) == arguments(alone)
    assert shared[-1].usage.completion_tokens == alone[-1].usage.completion_tokens  # type: ignore[union-attr]


async def test_abandoning_a_paused_request_frees_the_model(llm: LlamaCppBackend):
    before = dict(llm.stats)
    long_stream = llm.stream(ask("List all the things you know."), hostile(400))
    while not isinstance(await anext(long_stream), ToolCallDelta):
        pass
    short = asyncio.create_task(collect(llm, ask("Say hello."), GenerationParams(temperature=0.0, max_tokens=24)))
    await asyncio.sleep(0.3)  # both decode in the same steps now
    await long_stream.aclose()
    _, finished = await asyncio.wait_for(short, 60)
    assert finished.usage.completion_tokens > 0
    _, finished = await collect(llm, ask("Ok?"), GenerationParams(temperature=0.0, max_tokens=4))
    # The compute thread releases a slot just after handing over the last event: let it catch up.
    for _ in range(100):
        if llm.stats["cancelled"] == before["cancelled"] + 1 and all(s.user is None for s in llm._slots):
            break
        await asyncio.sleep(0.01)
    assert llm.stats["cancelled"] == before["cancelled"] + 1
    assert all(slot.user is None for slot in llm._slots)  # nobody holds a slot any more
