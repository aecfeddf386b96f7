"""RealtimeSession: the transport-agnostic state machine of one Realtime conversation.

Transports hand it raw client events (`handle_text`) and drain `outbox`; nothing here knows
whether the bytes came over a WebSocket or a WebRTC data channel.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import logging
import time
from typing import Any, Literal

from pydantic import ValidationError

from ..audio.codecs import decode_to_pcm16, encode_from_pcm16
from ..audio.output import OUTPUT_RATE, AudioOutput
from ..audio.resample import resample
from ..protocol import events as ev
from ..protocol.errors import ProtocolError, from_validation_error
from ..protocol.events import CLIENT_EVENT_MODELS, CLIENT_EVENT_TYPES, new_id
from ..protocol.items import SERVER_MCP_ITEMS, ContentPart, Item
from ..protocol.limits import loads_limited
from ..protocol.session import (
    OPENAI_REALTIME_MODEL,
    OPENAI_TRANSCRIPTION_MODEL,
    READ_ONLY_FIELDS,
    SessionConfig,
    SessionType,
    Transcription,
    TranscriptionSessionUpdate,
    deep_merge,
)
from ..protocol.text import find_lone_surrogate, scrub, top_level_event_id
from .content import check_item
from .context import EngineContext
from .conversation import Conversation
from .input import RATE as INPUT_RATE
from .input import InputAudio
from .mcp import McpSessionTools, check_mcp_tools
from .prefill import SpeculativePrefill
from .response import ResponseRun, SpokenAudio, resolve
from .stats import observe_turn
from .transcription import Transcriber
from .truncation import ContextWindow

log = logging.getLogger(__name__)

# A commit needs at least this much audio (same rule as the hosted API).
MIN_COMMIT_MS = 100
# Events a subscriber (a sideband) may leave unread before it is dropped: a reader that stopped
# must cost bounded memory and never hold up the session or its own transport.
SUBSCRIBER_MAX_PENDING = 4096


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
      InvalidSessionConfig (with `param`) for a bad initial session config. The session's type
      ("realtime" or "transcription") is `session_type` (a URL's `?intent=transcription`), else the
      initial session's `type`; it never changes afterwards (as on the hosted API).
    - ``await start()`` queues ``session.created``.
    - ``await handle_text(raw)`` processes one client event; bad input becomes an `error` event.
    - ``outbox``: asyncio.Queue of server events (JSON-ready dicts), in order; ``None`` after close.
    - ``subscribe()`` / ``unsubscribe(queue)``: more readers of the same events (sidebands), from
      the moment they subscribe; each queue gets ``None`` when the session closes or drops it.
    - ``await close()``: cancels everything the session runs; idempotent.
    """

    def __init__(
        self,
        ctx: EngineContext,
        *,
        transport: Literal["websocket", "webrtc"],
        initial_session: dict[str, Any] | None = None,
        model: str | None = None,
        api_key: str | None = None,
        session_type: SessionType | None = None,
    ):
        self.ctx = ctx
        self.transport = transport
        self.id = new_id("sess")
        self.outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        # Extra readers (subscribe()), each with the most events it may leave unread.
        self._subscribers: dict[asyncio.Queue[dict[str, Any] | None], int] = {}
        self.closed = False
        self.conversation = Conversation(new_id("conv"))
        if session_type is None:
            session_type = "transcription" if (initial_session or {}).get("type") == "transcription" else "realtime"
        self.config = SessionConfig(
            type=session_type,
            id=self.id,
            model=model or ctx.default_model,
            instructions=ctx.default_instructions,
            output_modalities=["audio"] if ctx.audio_output else ["text"],
            expires_at=int(time.time()) + ctx.session_ttl_s,
        )
        if session_type == "transcription":  # transcribing is all it does: on from the start
            self.config.audio.input.transcription = Transcription()
        self._substituted: set[tuple[str, str]] = set()
        if ctx.tts is not None and ctx.tts.voices():
            self.config.audio.output.voice = ctx.tts.voices()[0].id
        if model and ctx.check_model is not None and (problem := ctx.check_model(model)):
            # `?model=` / a call's model names an unknown provider: refuse before the session starts.
            raise InvalidSessionConfig(problem, "model", "model_not_found")
        self.config = self._effective_names(self.config, "session")
        if initial_session:
            try:
                self.config = self._merged_config(initial_session, "session")
            except ProtocolError as exc:
                raise InvalidSessionConfig(exc.message, exc.param, exc.code) from None
        self._runs: dict[str, ResponseRun] = {}
        self.mcp = McpSessionTools(self)  # remote MCP servers among the tools: their listings
        self._active: ResponseRun | None = None  # the default conversation's response
        self.prefill = SpeculativePrefill(self)  # the LLM reads the next prompt during the silence wait
        self._auto_response_pending = False
        # Set by a transport that plays audio itself (WebRTC) before start().
        self.audio_output: AudioOutput | None = None
        self.input = InputAudio(self)
        self.transcriber = Transcriber(self)
        self.input_audio: dict[str, bytes] = {}  # committed user audio (16 kHz) by item id
        self.spoken: dict[str, SpokenAudio] = {}  # assistant audio by item id
        self._idle_task: asyncio.Task | None = None
        # Rate-limit charges against a shared store, still in flight (cancelled on close).
        self._side_tasks: set[asyncio.Task[None]] = set()
        # Stage marks of the turn being answered (see ResponseRun.marks); logged per response.
        self.turn_marks: dict[str, float] = {}
        self._audio_out_marks: dict[str, dict[str, float]] = {}
        self._idle_armed_at_ms = 0.0
        # The key the client authenticated with: rate limits are per key (None: open server).
        self.api_key = api_key
        # Which items prompts leave out to fit the model's context (session `truncation`).
        self.context_window = ContextWindow()

    # ------------------------------------------------------------------ public API

    async def start(self) -> None:
        if self.audio_output is not None:
            self.audio_output.listener = self
        self.ctx.stats.session_started(self.id, self.transport)
        self.emit(ev.SessionCreated(session=self.config.wire()))
        self.mcp.sync(self.config.tools)

    async def push_audio(self, pcm16: bytes, sample_rate: int) -> None:
        """Caller audio from a media track (mono PCM16, any rate)."""
        if not self.closed:
            await self.input.append(pcm16, sample_rate)

    def emit(self, event: ev.ServerEvent) -> None:
        if not self.closed:
            self.ctx.stats.event_sent(event)
            wire = event.wire()
            self.outbox.put_nowait(wire)
            for queue, limit in list(self._subscribers.items()):
                if queue.qsize() >= limit:
                    self._drop_subscriber(queue, limit)
                else:
                    queue.put_nowait(wire)

    def subscribe(self, limit: int = SUBSCRIBER_MAX_PENDING) -> asyncio.Queue[dict[str, Any] | None]:
        """A queue of every event emitted from now on (the same dicts as `outbox`; do not mutate them).

        It gets ``None`` when the session closes, or when `limit` events are left unread: then the
        subscriber is dropped (its backlog discarded) rather than slowing or growing the session.
        """
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        if self.closed:
            queue.put_nowait(None)
        else:
            self._subscribers[queue] = max(1, limit)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        """Stop feeding `queue` (its reader went away); unknown queues are ignored."""
        self._subscribers.pop(queue, None)

    @property
    def subscriber_count(self) -> int:
        """Readers besides `outbox` (sidebands), so a transport can cap them."""
        return len(self._subscribers)

    def _drop_subscriber(self, queue: asyncio.Queue[dict[str, Any] | None], limit: int) -> None:
        self._subscribers.pop(queue, None)
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(None)
        log.warning("session %s: dropped an event subscriber that left %d events unread", self.id, limit)

    async def handle_text(self, raw: str | bytes) -> None:
        """Process one client event; every failure is answered with an `error` event."""
        event_id: str | None = None
        self.ctx.stats.event_received()
        try:
            if len(raw) > self.ctx.max_event_bytes:
                raise ProtocolError(f"Event of {len(raw)} bytes exceeds the limit of "
                                    f"{self.ctx.max_event_bytes} bytes.", code="event_too_large")
            try:
                data = loads_limited(raw)
            except ProtocolError as exc:
                if exc.code == "nesting_too_deep":
                    event_id = top_level_event_id(raw)
                raise
            if not isinstance(data, dict):
                raise ProtocolError("An event must be a JSON object.", code="invalid_event")
            if isinstance(data.get("event_id"), str):
                event_id = scrub(data["event_id"])[:512]
            if (where := find_lone_surrogate(data)) is not None:
                raise ProtocolError(f"Invalid value for '{where}': the string contains an unpaired UTF-16 "
                                    "surrogate, which is not valid Unicode text.", code="invalid_value",
                                    param=where)
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
        tasks = [run.task for run in self._runs.values() if run.task is not None] + list(self._side_tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._cancel_idle_timer()
        await self.mcp.close()
        await self.prefill.settle()
        await self.input.close()
        await self.transcriber.close()
        if self.audio_output is not None:
            self.audio_output.clear()
        self.closed = True
        self.ctx.stats.session_ended(self.id, self.transport)
        self.outbox.put_nowait(None)
        for queue in self._subscribers:
            queue.put_nowait(None)
        self._subscribers.clear()

    # ------------------------------------------------------------------ helpers used by responses

    def check_modalities(self, modalities: list[str], param: str) -> None:
        if "audio" in modalities and not self.ctx.audio_output:
            raise ProtocolError("Audio output needs a speech synthesis backend, and none is configured "
                                "on this server; use output_modalities ['text'].",
                                code="unsupported_modality", param=param)

    def check_voice(self, voice: str, param: str) -> str:
        """The TTS voice id for a requested voice name (ids, the backend's aliases, `voice_aliases`).

        Clients written for a hosted service name its voices ("Dennis", "Clive"); unless the
        operator asked for `strict_names`, those get the default voice rather than a refused
        `session.update` (which would drop the instructions and turn detection with it).
        """
        tts = self.ctx.tts
        if tts is None:
            return voice
        found = tts.resolve_voice(voice)
        if found is None and (alias := self.ctx.voice_aliases.get(voice.strip().lower())):
            found = tts.resolve_voice(alias)
        if found is not None:
            return found.id
        names = ", ".join(v.id for v in tts.voices())
        if self.ctx.strict_names or not tts.voices():
            raise ProtocolError(f"Unknown voice '{voice}'. Available voices: {names} (see GET /v1/voices).",
                                code="invalid_value", param=param)
        default = tts.voices()[0].id
        self._note_substitution("voice", voice, default)
        return default

    def _note_substitution(self, what: str, requested: str, used: str) -> None:
        """Log each name this session asked for and got something else for, once."""
        if (what, requested) not in self._substituted:
            self._substituted.add((what, requested))
            log.info("session %s: %s %r is not available here; using %r", self.id, what, requested, used)

    def _effective_names(self, config: SessionConfig, prefix: str) -> SessionConfig:
        """Replace requested names by what serves them, so session.updated shows the real config."""
        config.audio.output.voice = self.check_voice(config.audio.output.voice, f"{prefix}.audio.output.voice")
        if self.ctx.effective_model is not None:
            used = self.ctx.effective_model(config.model)
            if used != config.model:
                if not OPENAI_REALTIME_MODEL.match(config.model or ""):
                    self._note_substitution("model", config.model, used)
                config.model = used
        transcription = config.audio.input.transcription
        stt = self.ctx.stt
        if transcription is not None and stt is not None and transcription.model != stt.name:
            requested = transcription.model or ""
            if self.ctx.strict_names and requested and not OPENAI_TRANSCRIPTION_MODEL.match(requested):
                raise ProtocolError(f"Unknown transcription model '{requested}'. This server transcribes with "
                                    f"'{stt.name}'.", code="invalid_value",
                                    param=f"{prefix}.audio.input.transcription.model")
            if requested and not OPENAI_TRANSCRIPTION_MODEL.match(requested):
                self._note_substitution("transcription model", requested, stt.name)
            transcription.model = stt.name
        return config

    def _log_timing(self, response_id: str, marks: dict[str, float]) -> None:
        """One structured line per answered turn: bench/voice_latency.py reads these."""
        base = marks.get("speech_stopped", marks.get("response_created", 0.0))
        flags = ("speculative_stt", "speculative_llm")  # 1.0 / 0.0, not times
        rel = {k: round((v - base) * 1000, 1) for k, v in marks.items() if k not in flags}
        rel.update({k: marks.get(k, 0.0) for k in flags})
        log.info("turn-timing %s", json.dumps({"session": self.id, "response": response_id,
                                               "transport": self.transport, "base_monotonic": base, "ms": rel}))
        observe_turn(marks, self.transport)

    def response_finished(self, run: ResponseRun) -> None:
        self._runs.pop(run.id, None)
        self._report_rate_limits(run)
        if run.speaks and self.audio_output is not None and run.audio.ms:
            # WebRTC: the first audio "out" is when the player really starts sending it.
            marks = self._audio_out_marks.setdefault(run.id, {})
            marks.update(run.marks)
            while len(self._audio_out_marks) > 8:  # responses cleared before they were heard
                self._audio_out_marks.pop(next(iter(self._audio_out_marks)))
            if "audio_out" in marks:
                self._log_timing(run.id, self._audio_out_marks.pop(run.id))
        else:
            if run.first_audio_at:
                run.marks["audio_out"] = run.first_audio_at
            self._log_timing(run.id, run.marks)
        if run.speaks and run.audio.ms:
            if self.audio_output is not None:
                self.audio_output.finish(run.id)
            elif not self.closed:
                # WebSocket: the client plays it; assume real time from the first chunk on.
                played_until = run.first_audio_at + run.audio.ms / 1000
                self._arm_idle_timer(max(0.0, played_until - time.monotonic()))
        elif run.spec.in_conversation and not self.closed:
            self._arm_idle_timer(0.0)
        self._free_slot(run)

    def _free_slot(self, run: ResponseRun) -> None:
        """The conversation's response slot is free again: start the auto-response that waited for it."""
        if self._active is run:
            self._active = None
            if self._auto_response_pending and not self.closed:
                self._auto_response_pending = False
                self._start_auto_response()

    # ------------------------------------------------------------------ voice: turns and playback

    def commit_audio(self, pcm16k: bytes, item_id: str, speculative: asyncio.Task | None = None) -> Item:
        """Turn buffered speech into a user item and start transcribing it."""
        item = Item(id=item_id, type="message", role="user", status="completed",
                    content=[ContentPart(type="input_audio", transcript=None)])
        previous = self.conversation.insert(item)
        self.input_audio[item_id] = pcm16k
        self.emit(ev.InputAudioBufferCommitted(previous_item_id=previous, item_id=item_id))
        self.emit(ev.ConversationItemAdded(previous_item_id=previous, item=item.wire()))
        self.emit(ev.ConversationItemDone(previous_item_id=previous, item=item.wire()))
        self.transcriber.start(item, pcm16k, speculative)
        return item

    @property
    def transcription_only(self) -> bool:
        """A transcription session: audio in, transcripts out, never a response."""
        return self.config.type == "transcription"

    @property
    def responding(self) -> bool:
        """A response of the conversation is under way (its LLM request holds the session's cache slot)."""
        return self._active is not None

    def request_auto_response(self) -> None:
        """A turn ended under turn detection: answer now, or right after the current response."""
        if self.transcription_only:
            return
        if self._active is not None:
            self._auto_response_pending = True
        else:
            self._start_auto_response()

    async def on_user_speech(self, interrupt: bool) -> None:
        self._cancel_idle_timer()
        if interrupt:
            await self._interrupt("turn_detected")

    async def _interrupt(self, reason: str) -> None:
        """Barge-in: silence the speaker at once, stop generating, cut the item to what was heard."""
        cleared = self.audio_output.clear() if self.audio_output is not None else None
        run = self._active
        if run is not None and not run.done and run.task is not None:
            run.cancel(reason)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(run.task)
        if cleared is not None:
            self.emit(ev.OutputAudioBufferCleared(response_id=cleared.response_id))
            item = self.conversation.get(cleared.item_id)
            if item is not None:
                self._truncate(item, 0, cleared.played_ms)

    def playback_started(self, response_id: str) -> None:
        self._cancel_idle_timer()
        marks = self._audio_out_marks.setdefault(response_id, {})
        marks["audio_out"] = time.monotonic()
        if "response_created" in marks:  # the response already finished
            self._log_timing(response_id, self._audio_out_marks.pop(response_id))
        self.emit(ev.OutputAudioBufferStarted(response_id=response_id))

    def playback_stopped(self, response_id: str) -> None:
        self.emit(ev.OutputAudioBufferStopped(response_id=response_id))
        if self._active is None:
            self._arm_idle_timer(0.0)

    def _arm_idle_timer(self, delay_s: float) -> None:
        td = self.config.audio.input.turn_detection
        self._cancel_idle_timer()
        if td is None or td.type != "server_vad" or td.idle_timeout_ms is None:
            return
        self._idle_task = asyncio.create_task(self._idle(delay_s, td.idle_timeout_ms / 1000), name="idle-timeout")

    def _cancel_idle_timer(self) -> None:
        if self._idle_task is not None and self._idle_task is not asyncio.current_task():
            self._idle_task.cancel()
        self._idle_task = None

    async def _idle(self, playback_left_s: float, timeout_s: float) -> None:
        await asyncio.sleep(playback_left_s)
        start_ms = self.input.total_ms
        await asyncio.sleep(timeout_s)
        if self.closed or self._active is not None or self.input.speaking:
            return
        self._idle_task = None
        item_id = new_id("item")
        self.emit(ev.InputAudioBufferTimeoutTriggered(audio_start_ms=int(start_ms),
                                                      audio_end_ms=int(self.input.total_ms), item_id=item_id))
        self.commit_audio(self.input.take_all(), item_id)
        self._start_auto_response()

    def _truncate(self, item: Item, content_index: int, audio_end_ms: int) -> int:
        """Cut an assistant item's audio (and its transcript) to `audio_end_ms`, clamped; returns the cut."""
        spoken = self.spoken.get(item.id or "")
        content = item.content or []
        part = content[content_index]
        if spoken is not None:
            end_ms = min(audio_end_ms, spoken.ms)
            part.transcript = spoken.transcript_until(end_ms)
            spoken.cut(end_ms)
        else:  # audio the client supplied in conversation.item.create
            fmt = self.config.audio.output.format
            raw = base64.b64decode(part.audio or "")
            try:
                total_ms = len(decode_to_pcm16(raw, fmt.type)) // 2 * 1000 // fmt.sample_rate
            except ValueError as exc:
                raise ProtocolError(f"The item's audio cannot be cut: {exc}", param="item_id") from None
            end_ms = min(audio_end_ms, total_ms)
            keep = end_ms * fmt.sample_rate // 1000 * (2 if fmt.type == "audio/pcm" else 1)
            part.audio = base64.b64encode(raw[:keep]).decode()
            part.transcript = ""
        self.emit(ev.ConversationItemTruncated(item_id=item.id or "", content_index=content_index,
                                               audio_end_ms=end_ms))
        return end_ms

    # ------------------------------------------------------------------ dispatch

    async def _dispatch(self, event: Any) -> None:
        handler = getattr(self, "_on_" + event.type.replace(".", "_"))
        await handler(event)

    async def _on_session_update(self, event: ev.SessionUpdate) -> None:
        self.config = self._merged_config(event.session, "session")
        self.input.configure()
        if self.config.audio.input.turn_detection is None:
            self._cancel_idle_timer()
        self.emit(ev.SessionUpdated(session=self.config.wire()))
        self.mcp.sync(self.config.tools)

    def _merged_config(self, update: dict[str, Any], prefix: str) -> SessionConfig:
        update = {k: v for k, v in update.items() if k not in READ_ONLY_FIELDS}
        kind = update.get("type", self.config.type)
        if kind not in ("realtime", "transcription"):
            raise ProtocolError(f"Invalid value: {json.dumps(kind)}. Supported values are: 'realtime' and "
                                "'transcription'.", param=f"{prefix}.type")
        if kind != self.config.type:
            # The hosted API's answer: a session's type is fixed when it is created.
            raise ProtocolError(f"Passing a {kind} session update event to a {self.config.type} session is "
                                "not allowed.", param=f"{prefix}.type")
        if kind == "transcription":
            # Only the transcription shape: realtime-only fields are refused by name.
            try:
                TranscriptionSessionUpdate.model_validate({**update, "type": kind})
            except ValidationError as exc:
                raise from_validation_error(exc, update, prefix) from None
        merged = deep_merge(self.config.model_dump(mode="json"), update)
        try:
            config = SessionConfig.model_validate(merged)
        except ValidationError as exc:
            raise from_validation_error(exc, merged, prefix) from None
        self.check_modalities(config.output_modalities, f"{prefix}.output_modalities")
        check_mcp_tools(config.tools, self.ctx.mcp_allowed_hosts, self.ctx.mcp is not None, f"{prefix}.tools")
        if self.ctx.check_model is not None and config.model != self.config.model:
            problem = self.ctx.check_model(config.model)
            if problem:
                raise ProtocolError(problem, code="model_not_found", param=f"{prefix}.model")
        return self._effective_names(config, prefix)

    async def _on_conversation_item_create(self, event: ev.ConversationItemCreate) -> None:
        item = event.item.model_copy(deep=True)
        check_item(item, self.ctx.accepts_images, self.config.model)
        if item.id is None:
            item.id = new_id("item")
        for i, part in enumerate(item.content or []):
            if part.audio is not None:
                try:
                    base64.b64decode(part.audio, validate=True)
                except (binascii.Error, ValueError):
                    raise ProtocolError("Invalid value: audio must be base64-encoded.",
                                        param=f"item.content[{i}].audio") from None
        if item.type in SERVER_MCP_ITEMS:
            raise ProtocolError(f"'{item.type}' items are written by the server; a client answers an "
                                "mcp_approval_request with an 'mcp_approval_response' item.", param="item.type")
        if item.type == "mcp_approval_response" and not any(
            it.type == "mcp_approval_request" and it.id == item.approval_request_id for it in self.conversation
        ):
            raise ProtocolError(f"No mcp_approval_request with id '{item.approval_request_id}' in the conversation.",
                                param="item.approval_request_id")
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
        wire = item.wire(with_audio=True)
        # The full item includes its audio, in the session's formats (as the hosted API does).
        user_pcm = self.input_audio.get(item.id or "")
        spoken = self.spoken.get(item.id or "")
        if user_pcm is not None:
            fmt = self.config.audio.input.format
            raw = resample(user_pcm, INPUT_RATE, fmt.sample_rate)
            wire["content"][0]["audio"] = base64.b64encode(encode_from_pcm16(raw, fmt.type)).decode()
        elif spoken is not None:
            fmt = self.config.audio.output.format
            raw = resample(bytes(spoken.pcm), OUTPUT_RATE, fmt.sample_rate)
            wire["content"][0]["audio"] = base64.b64encode(encode_from_pcm16(raw, fmt.type)).decode()
        self.emit(ev.ConversationItemRetrieved(item=wire))

    async def _on_conversation_item_delete(self, event: ev.ConversationItemDelete) -> None:
        self.conversation.delete(event.item_id)
        self.input_audio.pop(event.item_id, None)
        self.spoken.pop(event.item_id, None)
        self.emit(ev.ConversationItemDeleted(item_id=event.item_id))

    async def _on_conversation_item_truncate(self, event: ev.ConversationItemTruncate) -> None:
        item = self.conversation.require(event.item_id)
        if item.type != "message" or item.role != "assistant":
            raise ProtocolError("Only assistant messages can be truncated.", param="item_id")
        content = item.content or []
        if event.content_index >= len(content):
            raise ProtocolError(f"content_index {event.content_index} is out of range.",
                                param="content_index")
        if content[event.content_index].type != "output_audio":
            raise ProtocolError("Only audio content can be truncated.", param="content_index")
        # Asking past the end clamps to the audio's length instead of failing.
        self._truncate(item, event.content_index, event.audio_end_ms)

    async def _on_response_create(self, event: ev.ResponseCreate) -> None:
        if self.transcription_only:
            raise ProtocolError("response.create is not supported in a transcription session: it only "
                                "transcribes input audio.", code="unsupported_event", param="type")
        if self._active is not None and (event.response is None or event.response.conversation != "none"):
            raise ProtocolError(
                f"Conversation already has an active response in progress: {self._active.id}. "
                "Wait until the response is finished before creating a new one.",
                code="conversation_already_has_active_response")
        self._start_response(event.response, event.event_id)

    def _start_response(self, config: ev.ResponseConfig | None, event_id: str | None = None) -> ResponseRun:
        spec = resolve(self, config)
        limiter = self.ctx.rate_limiter
        shared = limiter is not None and limiter.enabled and limiter.shared
        if limiter is not None and not shared and (refused := limiter.try_start(self.api_key)) is not None:
            raise ProtocolError(refused.message, code=refused.code, type=refused.type)
        self._cancel_idle_timer()
        run = ResponseRun(self, spec)
        if shared:  # the shared buckets are asked by the run itself, before `response.created`
            run.admit = functools.partial(self._admit_shared, event_id)
        self._runs[run.id] = run
        if spec.in_conversation:
            self._active = run
        run.start()
        return run

    def _start_auto_response(self) -> None:
        """A response the server starts (turn detection): a refusal becomes an `error` event."""
        if self.transcription_only:
            return
        try:
            self._start_response(None)
        except ProtocolError as exc:
            self.emit(ev.ErrorEvent(error=exc.detail(None)))

    async def _admit_shared(self, event_id: str | None) -> bool:
        """Take a request from the key's shared buckets; a refusal is an `error` event, as on one node."""
        limiter = self.ctx.rate_limiter
        assert limiter is not None
        refused = await limiter.try_start_shared(self.api_key)
        if refused is None:
            return True
        self.emit(ev.ErrorEvent(error=ProtocolError(refused.message, code=refused.code,
                                                    type=refused.type).detail(event_id)))
        return False

    async def _charge_shared(self, tokens: int) -> None:
        limiter = self.ctx.rate_limiter
        assert limiter is not None
        rate_limits = await limiter.charge_shared(self.api_key, tokens)
        if rate_limits is not None:
            self.emit(ev.RateLimitsUpdated(rate_limits=rate_limits))

    def response_refused(self, run: ResponseRun) -> None:
        """A run the shared rate limit refused before `response.created`: as if it never started."""
        self._runs.pop(run.id, None)
        self._free_slot(run)

    def _report_rate_limits(self, run: ResponseRun) -> None:
        """Charge the response's tokens to the key and send `rate_limits.updated`."""
        limiter = self.ctx.rate_limiter
        if limiter is None:
            return
        if limiter.shared:
            if limiter.enabled and not self.closed:
                tokens = 0 if run.usage is None else run.usage.prompt_tokens + run.usage.completion_tokens
                task = asyncio.create_task(self._charge_shared(tokens), name=f"rate-limits-{run.id}")
                self._side_tasks.add(task)
                task.add_done_callback(self._side_tasks.discard)
            return
        if run.usage is not None:
            limiter.add_tokens(self.api_key, run.usage.prompt_tokens + run.usage.completion_tokens)
        self.emit(ev.RateLimitsUpdated(rate_limits=limiter.snapshot(self.api_key)))

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
        run.cancel("client_cancelled")
        if run.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(run.task)

    async def _on_input_audio_buffer_append(self, event: ev.InputAudioBufferAppend) -> None:
        fmt = self.config.audio.input.format
        try:
            raw = base64.b64decode(event.audio, validate=True)
            pcm = decode_to_pcm16(raw, fmt.type)
        except (binascii.Error, ValueError) as exc:
            raise ProtocolError(f"Invalid audio: {exc}", param="audio") from None
        await self.input.append(pcm, fmt.sample_rate)

    async def _on_input_audio_buffer_commit(self, event: ev.InputAudioBufferCommit) -> None:
        ms = self.input.buffered_ms()
        if ms < MIN_COMMIT_MS:
            raise ProtocolError(f"Error committing input audio buffer: buffer too small. Expected at least "
                                f"{MIN_COMMIT_MS}ms of audio, but buffer only has {ms}ms of audio.",
                                code="input_audio_buffer_commit_empty")
        self.commit_audio(self.input.take_all(), new_id("item"))

    async def _on_input_audio_buffer_clear(self, event: ev.InputAudioBufferClear) -> None:
        self.input.clear()
        self.emit(ev.InputAudioBufferCleared())

    async def _on_output_audio_buffer_clear(self, event: ev.OutputAudioBufferClear) -> None:
        if self.audio_output is None:
            raise ProtocolError("output_audio_buffer.clear is only supported for WebRTC sessions.",
                                code="unsupported_event", param="type")
        cleared = self.audio_output.clear()
        if cleared is not None:
            self.emit(ev.OutputAudioBufferCleared(response_id=cleared.response_id))
            item = self.conversation.get(cleared.item_id)
            if item is not None:
                self._truncate(item, 0, cleared.played_ms)
