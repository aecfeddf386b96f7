"""The speculative reply (engine/prefill.py): adopted only by a response that asks for exactly its
prompt and sampling, replayed in full, and cancelled (never delivered) when the user goes on."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import pytest

from openrealtime.backends.llm import ChatMessage, Finished, LLMError, TextDelta

from .test_engine import ScriptedLLM, make_session, send

QUESTION = "What is the capital of France?"


async def speculating(llm: ScriptedLLM, *, generate: bool = True, create_response: bool = True):
    llm.prefills = True  # type: ignore[attr-defined]
    session = make_session(llm)
    session.ctx.speculative_prefill = True
    session.ctx.speculative_generation = generate
    turns = {"type": "server_vad", "create_response": create_response}
    await send(session, {"type": "session.update", "session": {
        "type": "realtime", "output_modalities": ["text"], "audio": {"input": {"turn_detection": turns}}}})
    transcript = asyncio.get_running_loop().create_future()
    transcript.set_result(SimpleNamespace(done=SimpleNamespace(text=QUESTION)))
    session.prefill.start(transcript)  # type: ignore[arg-type]
    for _ in range(200):
        if llm.prompts:
            break
        await asyncio.sleep(0.005)
    assert llm.prompts, "the prefill never asked the LLM"
    return session


async def test_only_the_same_prompt_and_sampling_adopt_it_and_it_replays_everything() -> None:
    llm = ScriptedLLM(["Paris", " is", " the", " capital."])
    session = await speculating(llm)
    messages, params = llm.prompts[0], llm.params[0]
    assert messages[-1].content == QUESTION and params.max_tokens is None  # the whole reply, not the prompt only
    await asyncio.sleep(0.05)  # it finishes before anyone asks
    other = [*messages[:-1], ChatMessage(role="user", content="What is the capital of Spain?")]
    assert session.prefill.adopt(other, params) is None
    assert session.prefill.adopt(messages, dataclasses.replace(params, temperature=0.2)) is None
    stream = session.prefill.adopt(messages, params)
    assert stream is not None
    got = [event async for event in stream]
    assert [e.text for e in got if isinstance(e, TextDelta)] == ["Paris", " is", " the", " capital."]
    assert isinstance(got[-1], Finished) and got[-1].finish_reason == "stop"
    assert session.prefill.adopt(messages, params) is None  # taken: one response only
    assert len(llm.prompts) == 1


async def test_a_response_adopting_it_midway_gets_the_rest_as_it_comes() -> None:
    llm = ScriptedLLM(["One", " two", " three", " four"], delay=0.05)
    session = await speculating(llm)
    stream = session.prefill.adopt(llm.prompts[0], llm.params[0])
    assert stream is not None
    got = [event.text async for event in stream if isinstance(event, TextDelta)]
    assert got == ["One", " two", " three", " four"]


async def test_the_user_going_on_cancels_it_and_nothing_is_left_to_adopt() -> None:
    llm = ScriptedLLM(["a"] * 100, delay=0.02)
    session = await speculating(llm)
    task = session.prefill.cancel()
    assert task is not None
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    assert session.prefill.adopt(llm.prompts[0], llm.params[0]) is None


async def test_leaving_an_adopted_stream_early_stops_the_generation() -> None:
    llm = ScriptedLLM(["a"] * 100, delay=0.02)
    session = await speculating(llm)
    task = session.prefill._task
    stream = session.prefill.adopt(llm.prompts[0], llm.params[0])
    assert stream is not None and task is not None
    async for _ in stream:
        break
    await stream.aclose()
    assert task.cancelled()  # stopped, not run to its end (100 words would take 2 s)


async def test_with_llm_speculate_off_only_the_prompt_is_evaluated() -> None:
    llm = ScriptedLLM(["Paris"])
    session = await speculating(llm, generate=False)
    assert llm.params[0].max_tokens == 0
    await asyncio.sleep(0.05)
    assert session.prefill.adopt(llm.prompts[0], dataclasses.replace(llm.params[0], max_tokens=None)) is None


class FailingLLM(ScriptedLLM):
    """Writes two words, then the backend fails."""

    async def stream(self, messages: list[ChatMessage], params):  # type: ignore[override]
        self.prompts.append(messages)
        self.params.append(params)
        yield TextDelta("Paris")
        await asyncio.sleep(0.05)
        yield TextDelta(" is")
        raise LLMError("the model crashed", code="backend_down")


async def test_a_backend_failure_after_adoption_reaches_the_response() -> None:
    llm = FailingLLM([])
    session = await speculating(llm)
    stream = session.prefill.adopt(llm.prompts[0], llm.params[0])
    assert stream is not None
    got: list[str] = []
    with pytest.raises(LLMError, match="crashed"):
        async for event in stream:
            got.append(event.text)  # type: ignore[union-attr]
    assert got == ["Paris", " is"]


async def test_a_failed_speculation_is_not_adopted() -> None:
    llm = FailingLLM([])
    session = await speculating(llm)
    await asyncio.sleep(0.15)
    assert session.prefill.adopt(llm.prompts[0], llm.params[0]) is None


async def test_when_the_client_creates_the_responses_only_the_prompt_is_evaluated() -> None:
    """create_response false: no response is coming to adopt a reply, which could run to its cap."""
    llm = ScriptedLLM(["Paris"])
    await speculating(llm, create_response=False)
    assert llm.params[0].max_tokens == 0


class SlowPrompt(ScriptedLLM):
    """Takes 0.2 s over any prompt, then ends without a word."""

    async def stream(self, messages: list[ChatMessage], params):  # type: ignore[override]
        self.prompts.append(messages)
        self.params.append(params)
        await asyncio.sleep(0.2)
        yield Finished(finish_reason="length")


async def open_session(llm: ScriptedLLM, *, setting: bool | str = "auto", turns: dict | None = None):
    llm.prefills = True  # type: ignore[attr-defined]
    session = make_session(llm)
    session.ctx.speculative_prefill = setting
    await send(session, {"type": "session.update", "session": {
        "type": "realtime", "output_modalities": ["text"], "instructions": "Be brief.",
        "audio": {"input": {"turn_detection": turns or {"type": "semantic_vad"}}}}})
    return session


async def settled(llm: ScriptedLLM, n: int = 1) -> None:
    for _ in range(100):
        if len(llm.prompts) >= n:
            return
        await asyncio.sleep(0.005)


async def test_the_start_of_speech_evaluates_the_prompt_up_to_the_users_words() -> None:
    """The open prefill (`start_turn`): the conversation and an empty, open user message, prompt
    only; a semantic_vad pause (no prefill there under "auto") leaves it running."""
    llm = SlowPrompt([])
    session = await open_session(llm)
    session.prefill.start_turn()
    await settled(llm)
    [messages], [params] = llm.prompts, llm.params
    assert [(m.role, m.content) for m in messages] == [("system", "Be brief."), ("user", "")]
    assert params.open_last and params.max_tokens == 0 and params.cache_key == session.id
    task = session.prefill._task
    transcript = asyncio.get_running_loop().create_future()
    session.prefill.start(transcript, semantic=True)  # type: ignore[arg-type]
    assert session.prefill._task is task and task is not None and not task.done()
    await asyncio.wait_for(task, 1)  # ran to its end
    await session.prefill.settle()
    assert session.prefill.adopt(messages, params) is None  # a prompt, not a reply to adopt


@pytest.mark.parametrize("case", ["setting off", "client answers", "no turn detection", "responding"])
async def test_no_open_prefill_when_nothing_would_use_it(case: str) -> None:
    llm = ScriptedLLM(["x"])
    turns = {"type": "server_vad", "create_response": case != "client answers"}
    session = await open_session(llm, setting=case != "setting off" and "auto", turns=turns)
    if case == "no turn detection":
        await send(session, {"type": "session.update", "session": {
            "type": "realtime", "audio": {"input": {"turn_detection": None}}}})
    if case == "responding":
        session._active = object()  # type: ignore[assignment]  # its request holds the cache slot
    session.prefill.start_turn()
    await asyncio.sleep(0.05)
    assert llm.prompts == [] and session.prefill._task is None
