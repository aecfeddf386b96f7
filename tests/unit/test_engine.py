"""RealtimeSession against a scripted LLM: event order, errors, cancellation, config merging."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter

from openrealtime.backends.llm import ChatMessage, Finished, GenerationParams, LLMError, TextDelta, Usage
from openrealtime.engine import EngineContext, InvalidSessionConfig, RealtimeSession

SERVER_EVENT = TypeAdapter(RealtimeServerEvent)


class ScriptedLLM:
    """Yields fixed words; records the prompts it was given."""

    name = "scripted"
    context_length = 4096

    def __init__(self, words: list[str], delay: float = 0.0, fail: bool = False):
        self.words = words
        self.delay = delay
        self.fail = fail
        self.prompts: list[list[ChatMessage]] = []
        self.params: list[GenerationParams] = []

    async def stream(self, messages: list[ChatMessage], params: GenerationParams) -> AsyncIterator:
        self.prompts.append(messages)
        self.params.append(params)
        if self.fail:
            raise LLMError("backend exploded", code="backend_down")
        n = 0
        for word in self.words:
            if params.max_tokens is not None and n >= params.max_tokens:
                yield Finished("length", Usage(10, n, 0))
                return
            await asyncio.sleep(self.delay)
            n += 1
            yield TextDelta(word)
        yield Finished("stop", Usage(10, n, 3))

    async def count_tokens(self, messages: list[ChatMessage], tools: object = None) -> int:
        return 10

    async def close(self) -> None:
        pass


def make_session(llm: ScriptedLLM, **kw) -> RealtimeSession:
    async def resolve(model: str | None) -> ScriptedLLM:
        return llm

    ctx = EngineContext(resolve_llm=resolve, default_model="smollm2-135m", default_instructions="Be brief.")
    return RealtimeSession(ctx, transport="websocket", **kw)


async def drain(session: RealtimeSession, until: str | None = None, timeout: float = 5.0) -> list[dict]:
    """Collect events until one of type `until` (or the queue is idle)."""
    out: list[dict] = []
    while True:
        try:
            event = await asyncio.wait_for(session.outbox.get(), timeout if until else 0.05)
        except TimeoutError:
            if until:
                raise AssertionError(f"no {until}; got {[e['type'] for e in out]}") from None
            return out
        assert event is not None
        SERVER_EVENT.validate_python(event, strict=True)
        out.append(event)
        if event["type"] == until:
            return out


async def send(session: RealtimeSession, event: dict) -> None:
    await session.handle_text(json.dumps(event))


def user_text(text: str) -> dict:
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}


async def test_session_created_first_and_text_response_sequence():
    llm = ScriptedLLM(["Hel", "lo", "!"])
    s = make_session(llm)
    await s.start()
    [created] = await drain(s)
    assert created["type"] == "session.created"
    assert created["session"]["output_modalities"] == ["text"]
    await send(s, user_text("Hi"))
    added, done = await drain(s)
    assert (added["type"], done["type"]) == ("conversation.item.added", "conversation.item.done")
    user_id = added["item"]["id"]
    await send(s, {"type": "response.create", "event_id": "ev1"})
    events = await drain(s, "response.done")
    types = [e["type"] for e in events]
    assert types == [
        "response.created", "response.output_item.added", "conversation.item.added",
        "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "conversation.item.done", "response.done",
    ]
    assert events[2]["previous_item_id"] == user_id
    done = events[-1]["response"]
    assert done["status"] == "completed"
    assert done["output"][0]["content"][0] == {"type": "output_text", "text": "Hello!"}
    assert done["usage"]["output_tokens"] == 3 and done["usage"]["input_token_details"]["cached_tokens"] == 3
    assert [m.role for m in llm.prompts[0]] == ["system", "user"]
    # The assistant reply is now part of the context of the next turn.
    await send(s, user_text("Again"))
    await send(s, {"type": "response.create"})
    await drain(s, "response.done")
    assert [(m.role, m.content) for m in llm.prompts[1]][1:] == [
        ("user", "Hi"), ("assistant", "Hello!"), ("user", "Again")]
    await s.close()


async def test_max_output_tokens_gives_incomplete():
    s = make_session(ScriptedLLM(["a", "b", "c", "d"]))
    await s.start()
    await send(s, user_text("Hi"))
    await send(s, {"type": "response.create", "response": {"max_output_tokens": 2}})
    done = (await drain(s, "response.done"))[-1]["response"]
    assert done["status"] == "incomplete"
    assert done["status_details"] == {"type": "incomplete", "reason": "max_output_tokens"}
    assert done["output"][0]["status"] == "incomplete"
    assert done["max_output_tokens"] == 2


async def test_cancel_active_response():
    s = make_session(ScriptedLLM(["w"] * 100, delay=0.01))
    await s.start()
    await send(s, user_text("Hi"))
    await send(s, {"type": "response.create"})
    await drain(s, "response.output_text.delta")
    await send(s, {"type": "response.cancel"})
    events = await drain(s, "response.done")
    assert events[-1]["response"]["status"] == "cancelled"
    assert events[-1]["response"]["status_details"]["reason"] == "client_cancelled"
    # Nothing to cancel now: a clear error, and the session goes on.
    await send(s, {"type": "response.cancel", "event_id": "c2"})
    [err] = [e for e in await drain(s) if e["type"] == "error"]
    assert err["error"]["event_id"] == "c2" and err["error"]["code"] == "response_cancel_not_active"
    await s.close()


async def test_one_active_response_but_out_of_band_runs_alongside():
    llm = ScriptedLLM(["x"] * 20, delay=0.01)
    s = make_session(llm)
    await s.start()
    await send(s, user_text("Hi"))
    await send(s, {"type": "response.create"})
    await send(s, {"type": "response.create", "event_id": "dup"})
    await send(s, {"type": "response.create", "response": {
        "conversation": "none", "metadata": {"topic": "summary"}, "instructions": "Summarise.",
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "OOB"}]}]}})
    events = await drain(s, "response.done")
    events += await drain(s, "response.done")
    errors = [e for e in events if e["type"] == "error"]
    assert errors[0]["error"]["code"] == "conversation_already_has_active_response"
    dones = [e["response"] for e in events if e["type"] == "response.done"]
    oob = next(d for d in dones if d["metadata"] == {"topic": "summary"})
    assert oob["conversation_id"] is None and oob["status"] == "completed"
    # Out-of-band output never enters the conversation.
    assert oob["output"][0]["id"] not in [it.id for it in s.conversation]
    assert llm.prompts[-1][0].content in ("Summarise.", "Be brief.")
    assert any(p[0].content == "Summarise." and p[1].content == "OOB" for p in llm.prompts)
    await s.close()


async def test_backend_failure_fails_response_and_session_survives():
    llm = ScriptedLLM(["ok"], fail=True)
    s = make_session(llm)
    await s.start()
    await send(s, user_text("Hi"))
    await send(s, {"type": "response.create"})
    done = (await drain(s, "response.done"))[-1]["response"]
    assert done["status"] == "failed"
    assert done["status_details"]["error"]["code"] == "backend_down"
    llm.fail = False
    await send(s, {"type": "response.create"})
    assert (await drain(s, "response.done"))[-1]["response"]["status"] == "completed"


@pytest.mark.parametrize(
    ("event", "code", "param"),
    [
        ("{not json", "invalid_json", None),
        ('{"type": "nope.nope"}', "invalid_value", "type"),
        ('{"event_id": "e"}', "missing_required_parameter", "type"),
        ('[1, 2]', "invalid_event", None),
        ('{"type": "session.update", "session": {"audio": {"output": {"speed": 3}}}}',
         "value_above_max", "session.audio.output.speed"),
        ('{"type": "session.update", "session": {"max_output_tokens": 5000}}',
         "value_above_max", "session.max_output_tokens"),
        ('{"type": "session.update", "session": {"max_output_tokens": "lots"}}',
         "invalid_value", "session.max_output_tokens"),
        ('{"type": "session.update", "session": {"temperature": "hot"}}', "invalid_type", "session.temperature"),
        ('{"type": "session.update", "session": {"bogus": 1}}', "unknown_parameter", "session.bogus"),
        ('{"type": "session.update", "session": {"audio": {"input": {"turn_detection": '
         '{"type": "server_vad", "threshold": 2}}}}}', "value_above_max",
         "session.audio.input.turn_detection.threshold"),
        ('{"type": "session.update", "session": {"output_modalities": ["audio"]}}',
         "unsupported_modality", "session.output_modalities"),
        ('{"type": "conversation.item.create", "item": {"type": "message", "role": "user", '
         '"content": [{"type": "output_text", "text": "x"}]}}', "invalid_value", "item"),
        ('{"type": "conversation.item.retrieve", "item_id": "missing"}', "item_not_found", "item_id"),
        ('{"type": "conversation.item.delete"}', "missing_required_parameter", "item_id"),
        ('{"type": "conversation.item.create", "item": {"type": "function_call_output", '
         '"call_id": "nope", "output": "{}"}}', "invalid_call_id", "item.call_id"),
        ('{"type": "input_audio_buffer.append", "audio": "###"}', "invalid_value", "audio"),
        ('{"type": "input_audio_buffer.commit"}', "input_audio_buffer_commit_empty", None),
        ('{"type": "response.create", "response": {"max_output_tokens": 0}}',
         "value_below_min", "response.max_output_tokens"),
        ('{"type": "response.create", "response": {"conversation": "conv_x"}}',
         "invalid_value", "response.conversation"),
    ],
)
async def test_bad_input_is_answered_and_session_goes_on(event: str, code: str, param: str | None):
    s = make_session(ScriptedLLM(["fine"]))
    await s.start()
    await drain(s)
    data = None
    try:
        data = json.loads(event)
    except ValueError:
        pass
    if isinstance(data, dict) and "type" in data:
        data["event_id"] = "evt_bad"
        event = json.dumps(data)
    await s.handle_text(event)
    [err] = await drain(s)
    assert err["type"] == "error", err
    assert (err["error"]["code"], err["error"]["param"]) == (code, param), err
    if isinstance(data, dict) and "type" in data:
        assert err["error"]["event_id"] == "evt_bad"
    # Still alive: a text turn works.
    await send(s, user_text("Hi"))
    await send(s, {"type": "response.create"})
    assert (await drain(s, "response.done"))[-1]["response"]["status"] == "completed"
    await s.close()


async def test_session_update_merges_partially_and_echoes_everything():
    s = make_session(ScriptedLLM([]))
    await s.start()
    await drain(s)
    await send(s, {"type": "session.update", "session": {
        "type": "realtime", "instructions": "Pirate.",
        "audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "high"}}}}})
    await send(s, {"type": "session.update", "session": {"audio": {"output": {"speed": 1.25}}}})
    _, updated = await drain(s)
    sess = updated["session"]
    assert sess["instructions"] == "Pirate."
    assert sess["audio"]["input"]["turn_detection"]["eagerness"] == "high"
    assert sess["audio"]["output"]["speed"] == 1.25
    assert sess["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert sess["max_output_tokens"] == "inf" and sess["id"] == s.id
    await send(s, {"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}})
    [updated] = await drain(s)
    assert updated["session"]["audio"]["input"]["turn_detection"] is None


def test_invalid_initial_session_raises_with_param():
    with pytest.raises(InvalidSessionConfig) as exc:
        make_session(ScriptedLLM([]), initial_session={"audio": {"output": {"speed": 9}}})
    assert exc.value.param == "session.audio.output.speed"


async def test_items_insert_retrieve_delete():
    s = make_session(ScriptedLLM([]))
    await s.start()
    await drain(s)
    await send(s, {**user_text("one"), "item": {**user_text("one")["item"], "id": "a"}})
    await send(s, {**user_text("three"), "item": {**user_text("three")["item"], "id": "c"}})
    await send(s, {**user_text("two"), "previous_item_id": "a", "item": {**user_text("two")["item"], "id": "b"}})
    events = await drain(s)
    assert events[-1]["previous_item_id"] == "a"
    assert [it.id for it in s.conversation] == ["a", "b", "c"]
    await send(s, {"type": "conversation.item.retrieve", "item_id": "b"})
    await send(s, {"type": "conversation.item.delete", "item_id": "b"})
    retrieved, deleted = await drain(s)
    assert retrieved["item"]["content"][0]["text"] == "two"
    assert deleted == {**deleted, "type": "conversation.item.deleted", "item_id": "b"}
    await send(s, {**user_text("dup"), "item": {**user_text("dup")["item"], "id": "a"}})
    [err] = await drain(s)
    assert err["error"]["code"] == "item_already_exists"


async def test_audio_buffer_commit_and_clear():
    s = make_session(ScriptedLLM([]))
    await s.start()
    await drain(s)
    import base64
    await send(s, {"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(4800 * 2)).decode()})
    await send(s, {"type": "input_audio_buffer.commit"})
    committed, added, _ = await drain(s)
    assert committed["type"] == "input_audio_buffer.committed"
    assert added["item"]["content"][0]["type"] == "input_audio"
    await send(s, {"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(480)).decode()})
    await send(s, {"type": "input_audio_buffer.clear"})
    [cleared] = await drain(s)
    assert cleared["type"] == "input_audio_buffer.cleared"
