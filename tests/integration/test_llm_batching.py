"""Continuous batching and per-conversation KV slots of the llama.cpp backend (real SmolLM2-135M).

What the scheduler promises: concurrent requests share decode steps and each still gets its own
continuation; a conversation keeps its cache between its turns while others talk; a cancelled
request leaves the batch without touching the others; slots and cells run out gracefully.
The assertions are on outputs (greedy, compared with the same prompt run alone) and on the
backend's own counters (``cache``, ``stats``), never on timings.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from openrealtime.backends.llamacpp import LlamaCppBackend
from openrealtime.backends.llm import ChatMessage, Finished, GenerationParams, LLMError, TextDelta

from .conftest import require_smollm2

require_smollm2()

SYSTEM = ChatMessage("system", "You are a helpful assistant. Do exactly what the user asks.")
# Copying text is the task a 135M model is surest of. A sequence mixed up with another one (wrong
# sequence id or position) copies the wrong sentence or garbage from the first token.
SENTENCES = [
    "The old fox jumps over the lazy dog.",
    "Seven green bottles stand on the wall.",
    "My cat sleeps under the kitchen table.",
    "Paris is the capital city of France.",
    "Bread and butter make a good breakfast.",
    "The train to Berlin leaves at noon.",
]


def repeat(sentence: str) -> list[ChatMessage]:
    return [SYSTEM, ChatMessage("user", f"Repeat this sentence exactly: {sentence}")]


def assert_own_continuations(outputs: list[str], alone: list[str], sentences: list[str]) -> None:
    """Each output continues its own prompt, and all but at most one equal the prompt run alone.

    Not all: where a conversation's cells lie in the shared cache changes the order of the float
    sums in attention, which can flip a greedy near-tie of a 135M model (seen once in a few runs).
    """
    for out, sentence in zip(outputs, sentences, strict=True):
        assert out.startswith(" ".join(sentence.split()[:2])), (out, sentence)
    same = sum(a == b for a, b in zip(outputs, alone, strict=True))
    assert same >= len(alone) - 1, list(zip(outputs, alone, strict=True))


def greedy(max_tokens: int = 14, key: str | None = None) -> GenerationParams:
    return GenerationParams(temperature=0.0, max_tokens=max_tokens, cache_key=key)


@pytest.fixture(scope="module")
async def llm(model_path: Path) -> AsyncIterator[LlamaCppBackend]:
    backend = await asyncio.to_thread(LlamaCppBackend, model_path, n_ctx=1024, n_threads=1, n_parallel=8)
    yield backend
    await backend.close()


async def run(llm: LlamaCppBackend, messages: list[ChatMessage], params: GenerationParams) -> tuple[str, Finished]:
    text = ""
    async for event in llm.stream(messages, params):
        if isinstance(event, TextDelta):
            text += event.text
        elif isinstance(event, Finished):
            return text, event
    raise AssertionError("no Finished")


async def settled(llm: LlamaCppBackend) -> None:
    """The compute thread releases slots just after the last event: wait until all are free."""
    for _ in range(200):
        if all(slot.user is None for slot in llm._slots):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("a slot stayed in use")


async def test_concurrent_streams_each_get_their_own_continuation(llm: LlamaCppBackend) -> None:
    alone = [(await run(llm, repeat(s), greedy()))[0] for s in SENTENCES]
    assert all(alone), alone
    steps, sequences = llm.cache["steps"], llm.cache["sequences"]
    together = await asyncio.gather(*(run(llm, repeat(s), greedy()) for s in SENTENCES))
    assert_own_continuations([text for text, _ in together], alone, SENTENCES)
    # They really shared steps: far more sequences evaluated than steps taken.
    n_steps, n_seqs = llm.cache["steps"] - steps, llm.cache["sequences"] - sequences
    assert n_seqs >= 3 * n_steps, (n_steps, n_seqs)


async def test_two_conversations_taking_turns_keep_their_caches(llm: LlamaCppBackend) -> None:
    """A and B alternate three turns each; every turn evaluates only what is new since its own
    previous turn, not the whole conversation again."""
    await settled(llm)
    history = {"A": [SYSTEM], "B": [SYSTEM]}
    last_prompt = {"A": 0, "B": 0}
    questions = {"A": ["Name a fruit.", "Name another one.", "And one more."],
                 "B": ["Name a colour.", "Name another colour.", "And a third colour."]}
    for turn in range(3):
        for who in ("A", "B"):
            messages = [*history[who], ChatMessage("user", questions[who][turn])]
            evaluated = llm.cache["evaluated"]
            text, finished = await run(llm, messages, greedy(12, key=f"conv-{who}"))
            new = llm.cache["evaluated"] - evaluated
            if turn:
                # The previous turn's whole prompt (and most of its reply) came from its slot.
                assert finished.usage.cached_tokens > last_prompt[who], (who, turn, finished.usage)
                assert new == finished.usage.prompt_tokens - finished.usage.cached_tokens
                assert new < 40, (who, turn, new)
            history[who] = [*messages, ChatMessage("assistant", text)]
            last_prompt[who] = finished.usage.prompt_tokens
            await settled(llm)


async def test_cancelling_one_request_leaves_the_batch_untouched(llm: LlamaCppBackend) -> None:
    await settled(llm)
    alone = [(await run(llm, repeat(s), greedy(20)))[0] for s in SENTENCES[:3]]
    cancelled_before = llm.stats["cancelled"]

    async def abandoned() -> None:
        stream = llm.stream(repeat(SENTENCES[3]), greedy(200))
        async for event in stream:
            if isinstance(event, TextDelta):
                break  # leave after the first delta, in the middle of the batch
        await stream.aclose()

    results = await asyncio.gather(abandoned(), *(run(llm, repeat(s), greedy(20)) for s in SENTENCES[:3]))
    assert_own_continuations([text for text, _ in results[1:]], alone, SENTENCES[:3])
    await settled(llm)
    assert llm.stats["cancelled"] == cancelled_before + 1


async def test_more_conversations_than_slots_wait_and_evict_by_recency(model_path: Path) -> None:
    llm = await asyncio.to_thread(LlamaCppBackend, model_path, n_ctx=512, n_threads=1, n_parallel=2)
    try:
        alone = [(await run(llm, repeat(s), greedy(key=f"k{i}")))[0] for i, s in enumerate(SENTENCES[:4])]
        evicted = llm.cache["evicted"]
        together = await asyncio.gather(*(run(llm, repeat(s), greedy(key=f"x{i}"))
                                          for i, s in enumerate(SENTENCES[:4])))
        # The two that waited for a slot ran correctly.
        assert_own_continuations([text for text, _ in together], alone, SENTENCES[:4])
        assert llm.cache["evicted"] > evicted  # new conversations took the least recently used slots
        await settled(llm)
        # The most recent conversation is still cached: its next turn reuses its prompt.
        _, finished = await run(llm, repeat(SENTENCES[3]), greedy(key="x3"))
        assert finished.usage.cached_tokens >= finished.usage.prompt_tokens - 1
    finally:
        await llm.close()


async def test_a_full_cache_evicts_idle_conversations_then_refuses_cleanly(model_path: Path) -> None:
    """Cells for about three short conversations only: idle ones are evicted for new ones; when the active
    requests alone overflow it, one fails with server_overloaded and the others finish."""
    llm = await asyncio.to_thread(LlamaCppBackend, model_path, n_ctx=128, n_threads=1, n_parallel=6,
                                  cache_tokens=128)
    try:
        assert llm.cache_cells <= 160
        for i, s in enumerate(SENTENCES):  # each leaves ~25 cells of its own (and shares ~26)
            text, _ = await run(llm, repeat(s), greedy(key=f"c{i}"))
            assert text
            await settled(llm)
        assert llm.cache["evicted"] >= 1  # not for want of slots (there are six): for cells
        stories = [[SYSTEM, ChatMessage("user", f"Write a very long story about {animal}.")]
                   for animal in ("a fox", "a cat", "a whale", "an owl")]
        outcomes = await asyncio.gather(*(run(llm, story, greedy(90, key=f"d{i}"))
                                          for i, story in enumerate(stories)), return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        assert all(isinstance(e, LLMError) and e.code == "server_overloaded" for e in errors), errors
        assert len(errors) < len(outcomes)  # somebody finished
        assert errors and llm.cache["overloaded"] == len(errors)
        await settled(llm)
        text, _ = await run(llm, repeat(SENTENCES[0]), greedy())  # and the model still serves
        assert text
    finally:
        await llm.close()
