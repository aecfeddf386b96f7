"""Transcribing committed user audio: for the client (transcription events) and for the LLM.

The LLM always needs the words, so committed audio is transcribed whenever an STT backend exists;
the `conversation.item.input_audio_transcription.*` events are sent only when the session asked
for transcription. Responses wait for the transcripts of the items in their prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..backends.speech import STTError, TranscriptDelta, TranscriptDone
from ..protocol import events as ev
from ..protocol.items import Item

if TYPE_CHECKING:
    from .session import RealtimeSession

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Transcript:
    deltas: list[str]
    done: TranscriptDone


class Transcriber:
    def __init__(self, session: RealtimeSession):
        self.s = session
        self._pending: dict[str, asyncio.Future[str]] = {}
        self._tasks: set[asyncio.Task] = set()
        self.finished_at: dict[str, float] = {}  # item id -> when its transcript was ready

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self, pcm16k: bytes) -> Transcript:
        stt = self.s.ctx.stt
        if stt is None:
            raise STTError("No speech-to-text backend is configured on this server.", code="stt_unavailable")
        cfg = self.s.config.audio.input.transcription
        deltas: list[str] = []
        done: TranscriptDone | None = None
        async with contextlib.aclosing(stt.transcribe(
                pcm16k, language=cfg.language if cfg else None, prompt=cfg.prompt if cfg else None)) as stream:
            async for chunk in stream:
                if isinstance(chunk, TranscriptDelta):
                    deltas.append(chunk.text)
                elif isinstance(chunk, TranscriptDone):
                    done = chunk
        if done is None:
            raise STTError("The transcription backend ended without a result.")
        return Transcript(deltas, done)

    def speculate(self, pcm16k: bytes) -> asyncio.Task:
        """Start transcribing a turn that may be over, before the silence wait confirms it."""
        return self._spawn(self._run(pcm16k), "stt-speculative")

    def start(self, item: Item, pcm16k: bytes, speculative: asyncio.Task | None = None) -> None:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending[item.id or ""] = future
        self._spawn(self._transcribe(item, pcm16k, speculative, future), f"stt-{item.id}")

    async def _transcribe(self, item: Item, pcm16k: bytes, speculative: asyncio.Task | None,
                          future: asyncio.Future[str]) -> None:
        report = self.s.config.audio.input.transcription is not None
        item_id = item.id or ""
        text = ""
        try:
            result = None
            if speculative is not None:
                with contextlib.suppress(asyncio.CancelledError, STTError):
                    result = await speculative
            if result is None:
                result = await self._run(pcm16k)
            text = result.done.text
            self.finished_at[item_id] = time.monotonic()
            while len(self.finished_at) > 64:  # items no response waited for
                self.finished_at.pop(next(iter(self.finished_at)))
            if item.content:
                item.content[0].transcript = text
            if report:
                for delta in result.deltas:
                    self.s.emit(ev.TranscriptionDelta(item_id=item_id, content_index=0, delta=delta))
                self.s.emit(ev.TranscriptionCompleted(
                    item_id=item_id, content_index=0, transcript=text,
                    usage={"type": "duration", "seconds": round(result.done.duration_s, 3)}))
        except STTError as exc:
            log.warning("transcription of %s failed: %s", item_id, exc)
            if report:
                self.s.emit(ev.TranscriptionFailed(item_id=item_id, content_index=0, error={
                    "type": "transcription_error", "code": exc.code, "message": str(exc), "param": None}))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("transcription of %s failed", item_id)
            if report:
                self.s.emit(ev.TranscriptionFailed(item_id=item_id, content_index=0, error={
                    "type": "server_error", "code": "transcription_failed", "message": str(exc), "param": None}))
        finally:
            if not future.done():
                future.set_result(text)
            self._pending.pop(item_id, None)

    async def wait_for(self, item_ids: list[str]) -> float | None:
        """Block until the transcripts these items are waiting for exist (or failed).

        Returns when the last of them was ready (for the latency waterfall), if any was transcribed.
        """
        futures = [self._pending[i] for i in item_ids if i in self._pending]
        if futures:
            await asyncio.gather(*(asyncio.shield(f) for f in futures))
        times = [self.finished_at.pop(i) for i in item_ids if i in self.finished_at]
        return max(times) if times else None

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
