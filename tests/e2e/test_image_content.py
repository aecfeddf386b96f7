"""`input_image` on a text-only local model, over a real WebSocket with the `openai` SDK: a clear
`error` naming the content part, never a silently dropped image.

Events are validated strictly against `openai.types.realtime` only: the `@openai/agents` zod
schema has no `input_image` content part, so an item echoed with its image (what happens while
images are refused at response.create rather than at conversation.item.create) fails it.
"""

from __future__ import annotations

import pytest
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter

from .conftest import Server, client
from .test_voice_websocket import Recorder

pytestmark = pytest.mark.e2e
SERVER_EVENT = TypeAdapter(RealtimeServerEvent)
PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGA"
         "hKmMIQAAAABJRU5ErkJggg==")


class ImageRecorder(Recorder):
    """The voice tests' recorder, validating with openai-python's types (strict) only."""

    async def _read(self) -> None:
        async for event in self.conn:
            data = event.to_dict()
            SERVER_EVENT.validate_python(data, strict=True)
            self.events.append(data)
            self._new.set()


async def test_image_on_a_text_only_model_is_an_error(server: Server):
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        rec = ImageRecorder(conn)
        await rec.wait_for("session.created")
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        await rec.wait_for("session.updated")
        mark = len(rec.events)
        await conn.conversation.item.create(event_id="evt_image", item={
            "id": "item_image", "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "What colour is this pixel?"},
                        {"type": "input_image", "image_url": PIXEL}]})
        await conn.response.create(event_id="evt_answer")
        error = (await rec.wait_for("error", after=mark))["error"]
        # Whichever event was refused, the next one proves nothing ran: ask for a text turn.
        await conn.conversation.item.delete(item_id="item_image", event_id="evt_delete")
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Hi"}]})
        # Bounded: SmolLM2 sometimes rambles to the 4096-token cap, which took over 90 s in a loaded CI run.
        await conn.response.create(response={"max_output_tokens": 48})
        done = await rec.wait_for("response.done", after=mark)
        rec.task.cancel()
    assert error["type"] == "invalid_request_error" and error["code"] == "unsupported_content", error
    assert error["event_id"] in ("evt_image", "evt_answer"), error
    assert error["param"] in ("item.content[1]", "item[item_image].content[1]"), error
    assert "text-only" in error["message"]
    created = [e for e in rec.events[mark:] if e["type"] == "response.created"]
    assert len(created) == 1 and created[0]["response"]["id"] == done["response"]["id"]  # only the text turn
    assert done["response"]["status"] in ("completed", "incomplete"), done  # it ran (incomplete: the cap)
