"""One model response: prompt assembly, streaming, and the exact Realtime event sequence."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..audio.codecs import encode_from_pcm16
from ..audio.resample import StreamResampler
from ..backends.llm import ChatMessage, Finished, GenerationParams, LLMBackend, LLMError, TextDelta, Usage
from ..backends.speech import TTSError
from ..protocol import events as ev
from ..protocol.errors import ProtocolError
from ..protocol.events import ItemReference, ResponseConfig, new_id
from ..protocol.items import ContentPart, Item
from .audio_io import OUTPUT_RATE
from .clauses import ClauseSplitter, speakable

if TYPE_CHECKING:
    from .session import RealtimeSession

log = logging.getLogger(__name__)

Status = Literal["in_progress", "completed", "cancelled", "incomplete", "failed"]
# Size of each `response.output_audio.delta` (WebSocket): small enough to start playback early.
DELTA_MS = 200


@dataclass(slots=True)
class SpokenAudio:
    """An assistant item's audio (24 kHz PCM16) and when each clause of its transcript was said."""

    pcm: bytearray = field(default_factory=bytearray)
    clauses: list[tuple[int, int, str]] = field(default_factory=list)  # (start_ms, end_ms, text)

    @property
    def ms(self) -> int:
        return len(self.pcm) // (OUTPUT_RATE * 2 // 1000)

    def transcript_until(self, end_ms: int) -> str:
        """The words heard up to `end_ms`, as closely as clause timing allows."""
        out = []
        for start, stop, text in self.clauses:
            if stop <= end_ms:
                out.append(text)
            elif start < end_ms:
                words = text.split()
                keep = len(words) * (end_ms - start) // max(1, stop - start)  # whole words heard
                if keep:
                    out.append(" ".join(words[:keep]))
                break
        return "".join(out).strip()

    def cut(self, end_ms: int) -> None:
        del self.pcm[end_ms * (OUTPUT_RATE * 2 // 1000):]


@dataclass(slots=True)
class ResolvedResponse:
    """Session defaults with the per-response overrides applied: what this response runs with."""

    instructions: str
    output_modalities: list[str]
    max_output_tokens: int | Literal["inf"]
    temperature: float
    voice: str
    speed: float
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
        voice=session.check_voice(voice, "response.voice"),
        speed=s.audio.output.speed,
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
        self._source = spec.input if spec.input is not None else list(session.conversation)
        self.messages: list[ChatMessage] = []  # built once the transcripts of the source exist
        self._text: list[str] = []
        self._deltas = 0
        self.audio = SpokenAudio()
        tts_rate = session.ctx.tts.sample_rate if session.ctx.tts else OUTPUT_RATE
        self._resampler = StreamResampler(tts_rate, OUTPUT_RATE)
        self._g711_resampler = StreamResampler(OUTPUT_RATE, 8000)
        self.first_audio_at = 0.0
        # Stage marks (monotonic seconds) for the latency waterfall; the turn's own marks first.
        self.marks: dict[str, float] = {**session.turn_marks, "response_created": time.monotonic()}
        session.turn_marks = {}

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

    @property
    def speaks(self) -> bool:
        return "audio" in self.spec.output_modalities

    async def run(self) -> None:
        emit = self.session.emit
        emit(ev.ResponseCreated(response=self.snapshot()))
        item: Item | None = None
        finished: Finished | None = None
        try:
            stt_done = await self.session.transcriber.wait_for([i.id for i in self._source if i.id])
            if stt_done is not None:
                self.marks["stt_done"] = stt_done
            self.marks["prompt_ready"] = time.monotonic()
            self.messages = self._messages(self._source)
            llm = await self.session.ctx.resolve_llm(self.session.config.model)
            max_tokens = self.spec.max_output_tokens
            params = GenerationParams(
                temperature=self.spec.temperature,
                max_tokens=None if max_tokens == "inf" else int(max_tokens),
            )
            item = self._open_item()
            if self.speaks:
                finished = await self._stream_speech(item, llm, params)
            else:
                finished = await self._stream_text(item, llm, params)
            self.usage = finished.usage if finished else Usage(completion_tokens=self._deltas)
            if finished is not None and finished.finish_reason == "length":
                self.status = "incomplete"
                self.status_details = {"type": "incomplete", "reason": "max_output_tokens"}
            else:
                self.status = "completed"
        except asyncio.CancelledError:
            self.status = "cancelled"
            self.status_details = {"type": "cancelled", "reason": self.cancel_reason}
            self.usage = Usage(completion_tokens=self._deltas)
        except (LLMError, TTSError) as exc:
            log.warning("response %s failed: %s", self.id, exc)
            self._fail(exc.code, str(exc), "server_error")
        except Exception as exc:  # a backend bug must not kill the session
            log.exception("response %s failed", self.id)
            self._fail("server_error", f"The model backend failed: {exc}", "server_error")
        finally:
            if item is not None:
                self._close_item(item)
            emit(ev.ResponseDone(response=self.snapshot()))
            self.session.response_finished(self)

    async def _stream_text(self, item: Item, llm: LLMBackend, params: GenerationParams) -> Finished | None:
        finished = None
        async with contextlib.aclosing(llm.stream(self.messages, params)) as stream:
            async for chunk in stream:
                if isinstance(chunk, TextDelta):
                    self.marks.setdefault("llm_first_token", time.monotonic())
                    if chunk.text:
                        self._deltas += 1
                        self._text.append(chunk.text)
                        self.session.emit(ev.ResponseOutputTextDelta(**self._part_ids(item), delta=chunk.text))
                elif isinstance(chunk, Finished):
                    finished = chunk
        return finished

    async def _stream_speech(self, item: Item, llm: LLMBackend, params: GenerationParams) -> Finished | None:
        """LLM and TTS run concurrently: each clause is spoken while the next is generated."""
        clauses: asyncio.Queue[str | None] = asyncio.Queue()
        result: list[Finished] = []

        async def produce() -> None:
            splitter = ClauseSplitter()
            try:
                async with contextlib.aclosing(llm.stream(self.messages, params)) as stream:
                    async for chunk in stream:
                        if isinstance(chunk, TextDelta):
                            self.marks.setdefault("llm_first_token", time.monotonic())
                            self._deltas += 1
                            for clause in splitter.push(chunk.text):
                                clauses.put_nowait(clause)
                        elif isinstance(chunk, Finished):
                            result.append(chunk)
                tail = splitter.flush()
                if tail.strip():
                    clauses.put_nowait(tail)
            finally:
                clauses.put_nowait(None)

        producer = asyncio.create_task(produce(), name=f"llm-{self.id}")
        try:
            while (clause := await clauses.get()) is not None:
                await self._speak(item, clause)
            self._play(item, self._resampler.flush(), final=True)
            await producer  # re-raises a backend failure
        finally:
            if not producer.done():
                producer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await producer
        return result[0] if result else None

    async def _speak(self, item: Item, clause: str) -> None:
        tts = self.session.ctx.tts
        assert tts is not None
        start = self.audio.ms
        self._text.append(clause)
        self.session.emit(ev.ResponseOutputAudioTranscriptDelta(**self._part_ids(item), delta=clause))
        self.marks.setdefault("first_clause", time.monotonic())
        async with contextlib.aclosing(
                tts.synthesize(speakable(clause), voice=self.spec.voice, speed=self.spec.speed)) as chunks:
            async for chunk in chunks:
                self._play(item, self._resampler.process(chunk))
        self.audio.clauses.append((start, self.audio.ms, clause))

    def _play(self, item: Item, pcm24: bytes, final: bool = False) -> None:
        """Send synthesized audio on: to the player (WebRTC) or as delta events (WebSocket).

        `final` flushes the resamplers' filter delay at the end of the response.
        """
        if not pcm24 and not final:
            return
        if pcm24 and not self.first_audio_at:
            self.first_audio_at = self.marks["tts_first_chunk"] = time.monotonic()
        self.audio.pcm.extend(pcm24)
        output = self.session.audio_output
        if output is not None:
            if pcm24:
                output.play(self.id, item.id or "", pcm24)
            return
        fmt = self.spec.audio_format.get("type", "audio/pcm")
        data = pcm24
        if fmt != "audio/pcm":
            data = encode_from_pcm16(self._g711_resampler.process(pcm24, last=final), fmt)
        step = (DELTA_MS * (OUTPUT_RATE if fmt == "audio/pcm" else 8000) // 1000) * (2 if fmt == "audio/pcm" else 1)
        for i in range(0, len(data), step):
            self.session.emit(ev.ResponseOutputAudioDelta(
                **self._part_ids(item), delta=base64.b64encode(data[i:i + step]).decode()))

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
        if self.speaks:
            self.session.spoken[item.id or ""] = self.audio
            item.content = [ContentPart(type="output_audio", transcript="")]
            part = {"type": "audio", "transcript": ""}
        else:
            item.content = [ContentPart(type="output_text", text="")]
            part = {"type": "text", "text": ""}
        emit(ev.ResponseContentPartAdded(**self._part_ids(item), part=part))
        return item

    def _close_item(self, item: Item) -> None:
        emit = self.session.emit
        ids = self._part_ids(item)
        text = "".join(self._text)
        if self.speaks:
            item.content = [ContentPart(type="output_audio", transcript=text)]
            emit(ev.ResponseOutputAudioDone(**ids))
            emit(ev.ResponseOutputAudioTranscriptDone(**ids, transcript=text))
            emit(ev.ResponseContentPartDone(**ids, part={"type": "audio", "transcript": text}))
        else:
            item.content = [ContentPart(type="output_text", text=text)]
            emit(ev.ResponseOutputTextDone(**ids, text=text))
            emit(ev.ResponseContentPartDone(**ids, part={"type": "text", "text": text}))
        item.status = "completed" if self.status == "completed" else "incomplete"
        emit(ev.ResponseOutputItemDone(response_id=self.id, output_index=ids["output_index"],
                                       item=item.wire()))
        if self.spec.in_conversation and self.session.conversation.get(item.id or "") is item:
            emit(ev.ConversationItemDone(previous_item_id=self.session.conversation.previous_id(item.id or ""),
                                         item=item.wire()))
