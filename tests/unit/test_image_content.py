"""`input_image` content: a text-only model refuses it with an `error`; a vision provider gets it."""

from __future__ import annotations

from pathlib import Path

import pytest

from openrealtime.backends.llm import ChatMessage, GenerationParams, ImageInput
from openrealtime.backends.openai_llm import OpenAICompatLLM
from openrealtime.backends.registry import LLMRegistry
from openrealtime.config import ProviderConfig, Settings
from openrealtime.engine import EngineContext, RealtimeSession
from openrealtime.engine.content import check_item
from openrealtime.engine.response import items_to_messages
from openrealtime.protocol.errors import ProtocolError
from openrealtime.protocol.items import Item

from .test_engine import ScriptedLLM, drain, send

PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGA"
         "hKmMIQAAAABJRU5ErkJggg==")


def image_item(item_id: str = "item_img") -> dict:
    return {"id": item_id, "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "What is in this picture?"},
                        {"type": "input_image", "image_url": PIXEL, "detail": "low"}]}


def make_session(llm: ScriptedLLM, vision: bool) -> RealtimeSession:
    async def resolve(model: str | None) -> ScriptedLLM:
        return llm

    ctx = EngineContext(resolve_llm=resolve, default_model="smollm2-135m", default_instructions="Be brief.",
                        accepts_images=lambda model: vision)
    return RealtimeSession(ctx, transport="websocket")


def test_check_item_names_the_image_part():
    item = Item.model_validate(image_item())
    with pytest.raises(ProtocolError) as exc:
        check_item(item, None, "smollm2-135m")
    assert (exc.value.type, exc.value.code, exc.value.param) == (
        "invalid_request_error", "unsupported_content", "item.content[1]")
    assert "text-only" in exc.value.message and "vision" in exc.value.message
    check_item(item, lambda model: True, "openai/gpt-4o-mini")  # a vision model: no error
    check_item(Item.model_validate({"type": "message", "role": "user",
                                    "content": [{"type": "input_text", "text": "hi"}]}), None, None)


async def test_text_only_model_answers_an_image_with_an_error_not_a_silent_drop():
    llm = ScriptedLLM(["A", " cat."])
    session = make_session(llm, vision=False)
    await session.start()
    await drain(session)
    await send(session, {"type": "conversation.item.create", "event_id": "evt_item", "item": image_item()})
    events = await drain(session, until="error")
    error = events[-1]["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "unsupported_content", error
    assert (error["event_id"], error["param"]) == ("evt_item", "item.content[1]"), error  # refused at create
    assert "conversation.item.added" not in [e["type"] for e in events]  # nothing half-stored
    assert not llm.prompts
    # The session goes on: a text-only turn is answered, and the refused item is not in its prompt.
    await send(session, {"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}})
    await send(session, {"type": "response.create"})
    done = await drain(session, until="response.done")
    assert done[-1]["response"]["status"] == "completed"
    assert [m.content for m in llm.prompts[-1] if m.role == "user"] == ["Hi"]
    await session.close()


async def test_inline_response_input_with_an_image_is_refused():
    llm = ScriptedLLM(["ok"])
    session = make_session(llm, vision=False)
    await session.start()
    await drain(session)
    await send(session, {"type": "response.create", "event_id": "evt_oob",
                         "response": {"conversation": "none", "input": [image_item("inline")]}})
    error = (await drain(session, until="error"))[-1]["error"]
    assert (error["code"], error["param"], error["event_id"]) == (
        "unsupported_content", "response.input[0].content[1]", "evt_oob")
    await session.close()


async def test_vision_model_gets_the_image_in_its_prompt():
    llm = ScriptedLLM(["A", " dot."])
    session = make_session(llm, vision=True)
    await session.start()
    await drain(session)
    await send(session, {"type": "conversation.item.create", "item": image_item()})
    await send(session, {"type": "response.create"})
    done = await drain(session, until="response.done")
    assert done[-1]["response"]["status"] == "completed"
    user = llm.prompts[0][-1]
    assert user.content == "What is in this picture?"
    assert user.images == [ImageInput(url=PIXEL, detail="low")]
    await session.close()


def test_image_only_message_is_kept():
    item = Item.model_validate({"type": "message", "role": "user",
                                "content": [{"type": "input_image", "image_url": PIXEL}]})
    [message] = items_to_messages([item])
    assert message.content == "" and message.images == [ImageInput(url=PIXEL, detail="auto")]


def test_vision_provider_sends_image_url_parts():
    llm = OpenAICompatLLM("http://vision.test/v1", None, "gpt-4o-mini", accepts_images=True)
    body = llm.request_body([ChatMessage(role="system", content="Be brief."),
                             ChatMessage(role="user", content="What is it?",
                                         images=[ImageInput(url=PIXEL, detail="high")])], GenerationParams())
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["messages"][1] == {"role": "user", "content": [
        {"type": "text", "text": "What is it?"},
        {"type": "image_url", "image_url": {"url": PIXEL, "detail": "high"}}]}
    plain = llm.request_body([ChatMessage(role="user", content="Hi")], GenerationParams())
    assert plain["messages"] == [{"role": "user", "content": "Hi"}]


async def test_registry_knows_which_models_read_images(tmp_path: Path):
    settings = Settings(model_cache_dir=tmp_path, llm_model="smollm2-135m", providers={
        "openai": ProviderConfig(base_url="http://vision.test/v1", vision=True),
        "groq": ProviderConfig(base_url="http://groq.test/v1")})
    registry = LLMRegistry(settings, factory=lambda *a, **k: pytest.fail("no local model loads"))
    assert registry.accepts_images("openai/gpt-4o-mini")
    assert not registry.accepts_images("groq/llama-3.1-8b")
    assert not registry.accepts_images("smollm2-135m") and not registry.accepts_images(None)
    backend = await registry.resolve("openai/gpt-4o-mini")
    assert isinstance(backend, OpenAICompatLLM) and backend.accepts_images
    await registry.close()
