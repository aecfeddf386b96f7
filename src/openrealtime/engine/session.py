"""RealtimeSession: the transport-agnostic state machine of one Realtime conversation.

Transports hand it raw client events (`handle_text`) and drain `outbox`; nothing here knows
whether the bytes came over a WebSocket or a WebRTC data channel.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from typing import Any, Literal

from pydantic import ValidationError

from ..audio.codecs import decode_to_pcm16
from ..protocol import events as ev
from ..protocol.errors import ProtocolError, from_validation_error
from ..protocol.events import CLIENT_EVENT_MODELS, CLIENT_EVENT_TYPES, new_id
from ..protocol.items import ContentPart, Item
from ..protocol.session import READ_ONLY_FIELDS, SessionConfig, deep_merge
from .context import EngineContext
from .conversation import Conversation
from .response import ResponseRun, resolve

log = logging.getLogger(__name__)

# A commit needs at least this much audio (same rule as the hosted API).
MIN_COMMIT_MS = 100


class InvalidSessionConfig(ValueError):
    """A session config that cannot be applied; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class RealtimeSession:
    """One conversation. Transports feed it raw client events and drain `outbox`.

    - ``RealtimeSession(ctx, transport="webrtc", initial_session={...}, model=...)`` raises
      InvalidSessionConfig (with `param`) for a bad initial session config.
    - ``await start()`` queues ``session.created``.
    - ``await handle_text(raw)`` processes one client event; bad input becomes an `error` event.
    - ``outbox``: asyncio.Queue of server events (JSON-ready dicts), in order; ``None`` after close.
    - ``await close()``: cancels everything the session runs; idempotent.
    """

    def __init__(
        self,
        ctx: EngineContext,
        *,
        transport: Literal["websocket", "webrtc"],
        initial_session: dict[str, Any] | None = None,
        model: str | None = None,
    ):
        self.ctx = ctx
        self.transport = transport
        self.id = new_id("sess")
        self.outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.closed = False
        self.conversation = Conversation(new_id("conv"))
        self.config = SessionConfig(
            id=self.id,
            model=model or ctx.default_model,
            instructions=ctx.default_instructions,
            output_modalities=["audio"] if ctx.audio_output else ["text"],
            expires_at=int(time.time()) + ctx.session_ttl_s,
        )
        if initial_session:
            try:
                self.config = self._merged_config(initial_session, "session")
            except ProtocolError as exc:
                raise InvalidSessionConfig(exc.message, exc.param, exc.code) from None
        self._runs: dict[str, ResponseRun] = {}
        self._active: ResponseRun | None = None  # the default conversation's response
        self._input_pcm = bytearray()  # PCM16 at the input format's rate

    # ------------------------------------------------------------------ public API

    async def start(self) -> None:
        self.emit(ev.SessionCreated(session=self.config.wire()))

    def emit(self, event: ev.ServerEvent) -> None:
        if not self.closed:
            self.outbox.put_nowait(event.wire())

    async def handle_text(self, raw: str | bytes) -> None:
        """Process one client event; every failure is answered with an `error` event."""
        event_id: str | None = None
        try:
            if len(raw) > self.ctx.max_event_bytes:
                raise ProtocolError(f"Event of {len(raw)} bytes exceeds the limit of "
                                    f"{self.ctx.max_event_bytes} bytes.", code="event_too_large")
            try:
                data = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ProtocolError(f"The event is not valid JSON: {exc}", code="invalid_json") from None
            if not isinstance(data, dict):
                raise ProtocolError("An event must be a JSON object.", code="invalid_event")
            if isinstance(data.get("event_id"), str):
                event_id = data["event_id"]
            kind = data.get("type")
            if kind is None:
                raise ProtocolError("Missing required parameter: 'type'.",
                                    code="missing_required_parameter", param="type")
            if kind not in CLIENT_EVENT_TYPES:
                supported = ", ".join(f"'{t}'" for t in CLIENT_EVENT_TYPES)
                raise ProtocolError(f"Invalid value: '{kind}'. Supported values are: {supported}.",
                                    code="invalid_value", param="type")
            try:
                event = CLIENT_EVENT_MODELS[kind].model_validate(data)
            except ValidationError as exc:
                raise from_validation_error(exc, data) from None
            await self._dispatch(event)
        except ProtocolError as exc:
            self.emit(ev.ErrorEvent(error=exc.detail(event_id)))
        except Exception as exc:
            log.exception("session %s: unexpected failure handling an event", self.id)
            self.emit(ev.ErrorEvent(error=ev.ErrorDetail(
                type="server_error", code="server_error", message=f"Internal error: {exc}",
                event_id=event_id)))

    async def close(self) -> None:
        if self.closed:
            return
        tasks = [run.task for run in self._runs.values() if run.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.closed = True
        self.outbox.put_nowait(None)

    # ------------------------------------------------------------------ helpers used by responses

    def check_modalities(self, modalities: list[str], param: str) -> None:
        if "audio" in modalities and not self.ctx.audio_output:
            raise ProtocolError("Audio output needs a speech synthesis backend, and none is configured "
                                "on this server; use output_modalities ['text'].",
                                code="unsupported_modality", param=param)

    def response_finished(self, run: ResponseRun) -> None:
        self._runs.pop(run.id, None)
        if self._active is run:
            self._active = None

    # ------------------------------------------------------------------ dispatch

    async def _dispatch(self, event: Any) -> None:
        handler = getattr(self, "_on_" + event.type.replace(".", "_"))
        await handler(event)

    async def _on_session_update(self, event: ev.SessionUpdate) -> None:
        self.config = self._merged_config(event.session, "session")
        self.emit(ev.SessionUpdated(session=self.config.wire()))

    def _merged_config(self, update: dict[str, Any], prefix: str) -> SessionConfig:
        update = {k: v for k, v in update.items() if k not in READ_ONLY_FIELDS}
        if update.get("type", "realtime") != "realtime":
            raise ProtocolError("Only 'realtime' sessions are supported.", param=f"{prefix}.type")
        merged = deep_merge(self.config.model_dump(mode="json"), update)
        try:
            config = SessionConfig.model_validate(merged)
        except ValidationError as exc:
            raise from_validation_error(exc, merged, prefix) from None
        self.check_modalities(config.output_modalities, f"{prefix}.output_modalities")
        return config

    async def _on_conversation_item_create(self, event: ev.ConversationItemCreate) -> None:
        item = event.item.model_copy(deep=True)
        if item.id is None:
            item.id = new_id("item")
        if item.type == "function_call_output" and not any(
            it.type == "function_call" and it.call_id == item.call_id for it in self.conversation
        ):
            raise ProtocolError(f"No function_call with call_id '{item.call_id}' in the conversation.",
                                code="invalid_call_id", param="item.call_id")
        item.status = "completed"
        previous = self.conversation.insert(item, event.previous_item_id)
        self.emit(ev.ConversationItemAdded(previous_item_id=previous, item=item.wire()))
        self.emit(ev.ConversationItemDone(previous_item_id=previous, item=item.wire()))

    async def _on_conversation_item_retrieve(self, event: ev.ConversationItemRetrieve) -> None:
        item = self.conversation.require(event.item_id)
        self.emit(ev.ConversationItemRetrieved(item=item.wire()))

    async def _on_conversation_item_delete(self, event: ev.ConversationItemDelete) -> None:
        self.conversation.delete(event.item_id)
        self.emit(ev.ConversationItemDeleted(item_id=event.item_id))

    async def _on_conversation_item_truncate(self, event: ev.ConversationItemTruncate) -> None:
        item = self.conversation.require(event.item_id)
        if item.type != "message" or item.role != "assistant":
            raise ProtocolError("Only assistant messages can be truncated.", param="item_id")
        content = item.content or []
        if event.content_index >= len(content):
            raise ProtocolError(f"content_index {event.content_index} is out of range.",
                                param="content_index")
        part = content[event.content_index]
        if part.type != "output_audio":
            raise ProtocolError("Only audio content can be truncated.", param="content_index")
        fmt = self.config.audio.output.format
        pcm = decode_to_pcm16(base64.b64decode(part.audio or ""), fmt.type)
        total_ms = len(pcm) // 2 * 1000 // fmt.sample_rate
        end_ms = min(event.audio_end_ms, total_ms)  # asking past the end clamps, never fails
        keep = end_ms * fmt.sample_rate // 1000 * (2 if fmt.type == "audio/pcm" else 1)
        part.audio = base64.b64encode(base64.b64decode(part.audio or "")[:keep]).decode()
        part.transcript = ""
        self.emit(ev.ConversationItemTruncated(item_id=item.id or "", content_index=event.content_index,
                                               audio_end_ms=end_ms))

    async def _on_response_create(self, event: ev.ResponseCreate) -> None:
        spec = resolve(self, event.response)
        if spec.in_conversation and self._active is not None:
            raise ProtocolError(
                f"Conversation already has an active response in progress: {self._active.id}. "
                "Wait until the response is finished before creating a new one.",
                code="conversation_already_has_active_response")
        run = ResponseRun(self, spec)
        self._runs[run.id] = run
        if spec.in_conversation:
            self._active = run
        run.task = asyncio.create_task(run.run(), name=f"response-{run.id}")

    async def _on_response_cancel(self, event: ev.ResponseCancel) -> None:
        if event.response_id:
            run = self._runs.get(event.response_id)
            if run is None:
                raise ProtocolError(f"No in-progress response with id '{event.response_id}'.",
                                    code="response_not_found", param="response_id")
        else:
            run = self._active
            if run is None:
                raise ProtocolError("Cancellation failed: no active response found.",
                                    code="response_cancel_not_active")
        run.cancel_reason = "client_cancelled"
        if run.task is not None:
            run.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(run.task)

    async def _on_input_audio_buffer_append(self, event: ev.InputAudioBufferAppend) -> None:
        try:
            raw = base64.b64decode(event.audio, validate=True)
            pcm = decode_to_pcm16(raw, self.config.audio.input.format.type)
        except (binascii.Error, ValueError) as exc:
            raise ProtocolError(f"Invalid audio: {exc}", param="audio") from None
        self._input_pcm.extend(pcm)

    async def _on_input_audio_buffer_commit(self, event: ev.InputAudioBufferCommit) -> None:
        rate = self.config.audio.input.format.sample_rate
        ms = len(self._input_pcm) // 2 * 1000 // rate
        if ms < MIN_COMMIT_MS:
            raise ProtocolError(f"Error committing input audio buffer: buffer too small. Expected at least "
                                f"{MIN_COMMIT_MS}ms of audio, but buffer only has {ms}ms of audio.",
                                code="input_audio_buffer_commit_empty")
        item = Item(id=new_id("item"), type="message", role="user", status="completed",
                    content=[ContentPart(type="input_audio", transcript=None)])
        self._input_pcm.clear()
        previous = self.conversation.insert(item)
        self.emit(ev.InputAudioBufferCommitted(previous_item_id=previous, item_id=item.id or ""))
        self.emit(ev.ConversationItemAdded(previous_item_id=previous, item=item.wire()))
        self.emit(ev.ConversationItemDone(previous_item_id=previous, item=item.wire()))

    async def _on_input_audio_buffer_clear(self, event: ev.InputAudioBufferClear) -> None:
        self._input_pcm.clear()
        self.emit(ev.InputAudioBufferCleared())

    async def _on_output_audio_buffer_clear(self, event: ev.OutputAudioBufferClear) -> None:
        if self.transport != "webrtc":
            raise ProtocolError("output_audio_buffer.clear is only supported for WebRTC sessions.",
                                code="unsupported_event", param="type")
        # No audio output track is playing anything yet: nothing to clear.
