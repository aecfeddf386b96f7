"""One model response: prompt assembly, streaming, and the exact Realtime event sequence."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..backends.llm import ChatMessage, Finished, GenerationParams, LLMError, TextDelta, Usage
from ..protocol import events as ev
from ..protocol.errors import ProtocolError
from ..protocol.events import ItemReference, ResponseConfig, new_id
from ..protocol.items import ContentPart, Item

if TYPE_CHECKING:
    from .session import RealtimeSession

log = logging.getLogger(__name__)

Status = Literal["in_progress", "completed", "cancelled", "incomplete", "failed"]


@dataclass(slots=True)
class ResolvedResponse:
    """Session defaults with the per-response overrides applied: what this response runs with."""

    instructions: str
    output_modalities: list[str]
    max_output_tokens: int | Literal["inf"]
    temperature: float
    voice: str
    audio_format: dict[str, Any]
    metadata: dict[str, str] | None
    in_conversation: bool
    input: list[Item] | None = None
    tools: list[Any] = field(default_factory=list)


def resolve(session: RealtimeSession, cfg: ResponseConfig | None) -> ResolvedResponse:
    """Merge a `response.create` config over the session (overrides apply to this response only)."""
    s = session.config
    cfg = cfg or ResponseConfig()
    if cfg.conversation not in ("auto", "none"):
        raise ProtocolError("Only the default conversation ('auto') or 'none' is supported.",
                            param="response.conversation")
    voice = cfg.voice or (cfg.audio.output.voice if cfg.audio and cfg.audio.output else None) or s.audio.output.voice
    fmt = (cfg.audio.output.format if cfg.audio and cfg.audio.output and cfg.audio.output.format
           else s.audio.output.format)
    modalities = list(dict.fromkeys(cfg.output_modalities or s.output_modalities))
    session.check_modalities(modalities, "response.output_modalities")
    items: list[Item] | None = None
    if cfg.input is not None:
        items = []
        for i, entry in enumerate(cfg.input):
            if isinstance(entry, ItemReference):
                items.append(session.conversation.require(entry.id, f"response.input[{i}].id"))
            else:
                items.append(entry)
    return ResolvedResponse(
        instructions=cfg.instructions if cfg.instructions is not None else s.instructions,
        output_modalities=modalities,
        max_output_tokens=cfg.max_output_tokens if cfg.max_output_tokens is not None else s.max_output_tokens,
        temperature=cfg.temperature if cfg.temperature is not None else s.temperature,
        voice=voice,
        audio_format=fmt.model_dump(mode="json", exclude_none=True),
        metadata=cfg.metadata,
        in_conversation=cfg.conversation == "auto",
        input=items,
        tools=list(cfg.tools if cfg.tools is not None else s.tools),
    )


def item_to_message(item: Item) -> ChatMessage | None:
    """How a conversation item reads to a chat model (None: nothing to say)."""
    if item.type == "message":
        text = item.text_for_model()
        return ChatMessage(role=item.role, content=text) if text else None  # type: ignore[arg-type]
    if item.type == "function_call":
        return ChatMessage(role="assistant", content=f"[called {item.name}({item.arguments})]")
    return ChatMessage(role="tool", content=item.output or "")


class ResponseRun:
    """Runs in its own task; cancelling the task cancels the response cleanly."""

    def __init__(self, session: RealtimeSession, spec: ResolvedResponse):
        self.session = session
        self.spec = spec
        self.id = new_id("resp")
        self.status: Status = "in_progress"
        self.status_details: dict[str, Any] | None = None
        self.output: list[Item] = []
        self.usage: Usage | None = None
        self.cancel_reason: str = "client_cancelled"
        self.task: asyncio.Task[None] | None = None
        # Snapshot of the context now: items the client adds later belong to the next turn.
        source = spec.input if spec.input is not None else list(session.conversation)
        self.messages = self._messages(source)

    # ------------------------------------------------------------------ state

    @property
    def done(self) -> bool:
        return self.status != "in_progress"

    def snapshot(self) -> dict[str, Any]:
        usage = None
        if self.usage is not None:
            u = self.usage
            usage = {
                "total_tokens": u.prompt_tokens + u.completion_tokens,
                "input_tokens": u.prompt_tokens,
                "output_tokens": u.completion_tokens,
                "input_token_details": {
                    "text_tokens": u.prompt_tokens, "audio_tokens": 0, "image_tokens": 0,
                    "cached_tokens": u.cached_tokens,
                    "cached_tokens_details": {"text_tokens": u.cached_tokens, "audio_tokens": 0,
                                              "image_tokens": 0},
                },
                "output_token_details": {"text_tokens": u.completion_tokens, "audio_tokens": 0},
            }
        return {
            "object": "realtime.response",
            "id": self.id,
            "status": self.status,
            "status_details": self.status_details,
            "output": [item.wire() for item in self.output],
            "conversation_id": self.session.conversation.id if self.spec.in_conversation else None,
            "output_modalities": self.spec.output_modalities,
            "max_output_tokens": self.spec.max_output_tokens,
            "audio": {"output": {"format": self.spec.audio_format, "voice": self.spec.voice}},
            "usage": usage,
            "metadata": self.spec.metadata,
        }

    def _messages(self, items: list[Item]) -> list[ChatMessage]:
        messages = []
        if self.spec.instructions:
            messages.append(ChatMessage(role="system", content=self.spec.instructions))
        for item in items:
            msg = item_to_message(item)
            if msg is not None:
                messages.append(msg)
        return messages

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        emit = self.session.emit
        emit(ev.ResponseCreated(response=self.snapshot()))
        item: Item | None = None
        text_parts: list[str] = []
        finished: Finished | None = None
        try:
            llm = await self.session.ctx.resolve_llm(self.session.config.model)
            max_tokens = self.spec.max_output_tokens
            params = GenerationParams(
                temperature=self.spec.temperature,
                max_tokens=None if max_tokens == "inf" else int(max_tokens),
            )
            item = self._open_item()
            async with contextlib.aclosing(llm.stream(self.messages, params)) as stream:
                async for chunk in stream:
                    if isinstance(chunk, TextDelta):
                        if chunk.text:
                            text_parts.append(chunk.text)
                            emit(ev.ResponseOutputTextDelta(**self._part_ids(item), delta=chunk.text))
                    elif isinstance(chunk, Finished):
                        finished = chunk
            self.usage = finished.usage if finished else Usage(completion_tokens=len(text_parts))
            if finished is not None and finished.finish_reason == "length":
                self.status = "incomplete"
                self.status_details = {"type": "incomplete", "reason": "max_output_tokens"}
            else:
                self.status = "completed"
        except asyncio.CancelledError:
            self.status = "cancelled"
            self.status_details = {"type": "cancelled", "reason": self.cancel_reason}
            self.usage = Usage(completion_tokens=len(text_parts))
        except LLMError as exc:
            log.warning("response %s failed: %s", self.id, exc)
            self._fail(exc.code, str(exc), "server_error")
        except Exception as exc:  # a backend bug must not kill the session
            log.exception("response %s failed", self.id)
            self._fail("server_error", f"The model backend failed: {exc}", "server_error")
        finally:
            if item is not None:
                self._close_item(item, "".join(text_parts))
            emit(ev.ResponseDone(response=self.snapshot()))
            self.session.response_finished(self)

    def _fail(self, code: str, message: str, type: str) -> None:
        self.status = "failed"
        self.status_details = {"type": "failed", "error": {"type": type, "code": code, "message": message}}

    def _part_ids(self, item: Item) -> dict[str, Any]:
        return {"response_id": self.id, "item_id": item.id, "output_index": self.output.index(item),
                "content_index": 0}

    def _open_item(self) -> Item:
        item = Item(id=new_id("item"), type="message", role="assistant", status="in_progress", content=[])
        self.output.append(item)
        emit = self.session.emit
        emit(ev.ResponseOutputItemAdded(response_id=self.id, output_index=len(self.output) - 1,
                                        item=item.wire()))
        if self.spec.in_conversation:
            previous = self.session.conversation.insert(item)
            emit(ev.ConversationItemAdded(previous_item_id=previous, item=item.wire()))
        item.content = [ContentPart(type="output_text", text="")]
        emit(ev.ResponseContentPartAdded(**self._part_ids(item), part={"type": "text", "text": ""}))
        return item

    def _close_item(self, item: Item, text: str) -> None:
        emit = self.session.emit
        ids = self._part_ids(item)
        item.content = [ContentPart(type="output_text", text=text)]
        emit(ev.ResponseOutputTextDone(**ids, text=text))
        emit(ev.ResponseContentPartDone(**ids, part={"type": "text", "text": text}))
        item.status = "completed" if self.status == "completed" else "incomplete"
        emit(ev.ResponseOutputItemDone(response_id=self.id, output_index=ids["output_index"],
                                       item=item.wire()))
        if self.spec.in_conversation and self.session.conversation.get(item.id or "") is item:
            emit(ev.ConversationItemDone(previous_item_id=self.session.conversation.previous_id(item.id or ""),
                                         item=item.wire()))
