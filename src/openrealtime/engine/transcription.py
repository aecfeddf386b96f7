"""Transcribing committed user audio: for the client (transcription events) and for the LLM.

The LLM always needs the words, so committed audio is transcribed whenever an STT backend exists;
the `conversation.item.input_audio_transcription.*` events are sent only when the session asked
for transcription. Responses wait for the transcripts of the items in their prompt.

Transcription sessions also stream deltas while the user is still speaking: every
`partial_transcript_ms` of new speech the utterance so far is decoded again (at most one such
decode per session, and only while no other transcription is under way anywhere, so they never
delay a turn), and the words two consecutive decodes agree on are sent (engine/live_transcript.py).
Realtime sessions with a local LLM decode the utterance so far the same way (every
`prefill_words_ms`), but only for the LLM to read the words ahead of the end of the turn
(engine/prefill.py); nothing is sent, and the turn's own transcript is the final decode alone.
With `include: ["item.input_audio_transcription.logprobs"]` the deltas and `completed` carry one
log probability per word, when the STT backend reports them (local Whisper does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..backends.speech import STTError, TranscriptDelta, TranscriptDone
from ..protocol import events as ev
from ..protocol.items import Item
from .live_transcript import StableTranscript, Word, hypothesis, join, logprob_entries

if TYPE_CHECKING:
    from .session import RealtimeSession

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Transcript:
    deltas: list[str]
    done: TranscriptDone


@dataclass(slots=True)
class _Live:
    """The utterance being spoken in a transcription session and its deltas so far."""

    item_id: str
    stable: StableTranscript
    decoded_ms: float = 0.0  # speech covered by the latest partial decode started
    task: asyncio.Task | None = None


@dataclass(slots=True)
class _Words:
    """The utterance being spoken in a realtime session, decoded for the LLM's prefill."""

    item_id: str
    decoded_ms: float = 0.0  # speech covered by the latest partial decode started
    task: asyncio.Task | None = None


class Transcriber:
    def __init__(self, session: RealtimeSession):
        self.s = session
        self._pending: dict[str, asyncio.Future[str]] = {}
        self._tasks: set[asyncio.Task] = set()
        self.finished_at: dict[str, float] = {}  # item id -> when its transcript was ready
        self._live: _Live | None = None
        self._words_so_far: _Words | None = None

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def _logprobs(self) -> bool:
        """Logprobs were asked for and the backend can give them (word probabilities)."""
        return self.s.config.logprobs and bool(getattr(self.s.ctx.stt, "supports_word_probabilities", False))

    async def _run(self, pcm16k: bytes, *, final: bool = True, guess: bool = False) -> Transcript:
        """`guess`: words for the prefill only (`partial_words`): the backend's quick partial decode."""
        stt = self.s.ctx.stt
        if stt is None:
            raise STTError("No speech-to-text backend is configured on this server.", code="stt_unavailable")
        cfg = self.s.config.audio.input.transcription
        options: dict[str, Any] = {"word_probabilities": True} if self._logprobs and not guess else {}
        if guess:
            options["partial"] = True
        deltas: list[str] = []
        done: TranscriptDone | None = None
        load = self.s.ctx.stt_load
        if final:  # partial decodes are counted from the moment they are scheduled (partial())
            load.final += 1
        try:
            async with contextlib.aclosing(stt.transcribe(
                    pcm16k, language=cfg.language if cfg else None, prompt=cfg.prompt if cfg else None,
                    **options)) as stream:
                async for chunk in stream:
                    if isinstance(chunk, TranscriptDelta):
                        deltas.append(chunk.text)
                    elif isinstance(chunk, TranscriptDone):
                        done = chunk
        finally:
            if final:
                load.final -= 1
        if done is None:
            raise STTError("The transcription backend ended without a result.")
        return Transcript(deltas, done)

    def _words(self, done: TranscriptDone) -> list[Word]:
        return hypothesis(done.text, done.words if self._logprobs else None)

    def _emit_delta(self, item_id: str, words: list[Word], first: bool) -> None:
        self.s.emit(ev.TranscriptionDelta(item_id=item_id, content_index=0, delta=join(words, first),
                                          logprobs=logprob_entries(words, first) if self._logprobs else None))

    # ------------------------------------------------------------------ deltas while speaking

    def partial(self, item_id: str, speech_ms: float, audio: Callable[[], bytes]) -> None:
        """Speech of `item_id` is going on (`speech_ms` so far): decode it again if it is time.

        Called by the input buffer as audio arrives, in transcription sessions, outside pauses.
        `audio` gives the utterance so far (only called when a decode starts).
        """
        interval = self.s.ctx.partial_transcript_ms
        if interval <= 0 or self.s.ctx.stt is None or self.s.config.audio.input.transcription is None:
            return
        live = self._live
        if live is None or live.item_id != item_id:
            self.drop_live()
            live = self._live = _Live(item_id, StableTranscript())
        self._decode_again(live, speech_ms, interval, lambda: self._partial(live, audio()), "stt-partial")

    def _decode_again(self, state: _Live | _Words, speech_ms: float, interval: int,
                      decode: Callable[[], Any], name: str) -> None:
        """Start `decode` (a partial decode of the utterance `state` follows) if none is under way,
        `interval` ms of new speech came since the last, and no transcription runs anywhere."""
        load = self.s.ctx.stt_load
        if state.task is not None or speech_ms - state.decoded_ms < interval or load.final or load.partial:
            return
        state.decoded_ms = speech_ms
        load.partial += 1
        task = state.task = self._spawn(decode(), f"{name}-{state.item_id}")

        def finished(_: asyncio.Task) -> None:  # also when cancelled before it ever ran
            load.partial -= 1
            if state.task is task:
                state.task = None

        task.add_done_callback(finished)

    async def _partial(self, live: _Live, pcm16k: bytes) -> None:
        try:
            result = await self._run(pcm16k, final=False)
        except STTError as exc:  # the final decode reports failures; a partial one just adds nothing
            log.debug("partial transcription of %s failed: %s", live.item_id, exc)
            return
        if self._live is not live or self.s.closed:
            return
        log.debug("session %s: partial decode of %s at %.0f ms of speech: %r", self.s.id, live.item_id,
                  live.decoded_ms, result.done.text)
        first = not live.stable.sent
        new = live.stable.update(self._words(result.done))
        if new:
            self._emit_delta(live.item_id, new, first)

    def drop_live(self) -> None:
        """Forget the utterance being transcribed while spoken (its audio was cleared or replaced)."""
        live, self._live = self._live, None
        if live is not None and live.task is not None:
            live.task.cancel()
        self.drop_words()

    # ------------------------------------------------------------------ words for the LLM while speaking

    def partial_words(self, item_id: str, speech_ms: float, audio: Callable[[], bytes]) -> None:
        """Realtime sessions: speech of `item_id` goes on (`speech_ms` so far); decode it again for
        the prefill if it is time (the same rules as `partial`: one at a time, an idle STT only)."""
        interval, stt = self.s.ctx.prefill_words_ms, self.s.ctx.stt
        if interval <= 0 or not getattr(stt, "supports_partial", False) or not self.s.prefill.wants_words():
            return
        words = self._words_so_far
        if words is None or words.item_id != item_id:
            self.drop_words()
            words = self._words_so_far = _Words(item_id)
        self._decode_again(words, speech_ms, interval, lambda: self._partial_words(words, audio()), "stt-words")

    async def _partial_words(self, words: _Words, pcm16k: bytes) -> None:
        try:
            result = await self._run(pcm16k, final=False, guess=True)
        except STTError as exc:
            log.debug("partial transcription of %s failed: %s", words.item_id, exc)
            return
        if self._words_so_far is not words or self.s.closed:
            return
        # The audio stops mid-word: the last word is likely cut (and its "." invented), so the
        # LLM reads the words before it.
        said = result.done.text.split()[:-1]
        log.debug("session %s: words so far of %s at %.0f ms of speech: %r", self.s.id, words.item_id,
                  words.decoded_ms, " ".join(said))
        if said:
            self.s.prefill.start_turn(" ".join(said))

    def drop_words(self, *, forget: bool = True) -> None:
        """Stop decoding the utterance for the prefill: the turn ended (`forget`), or a pause began
        (the next decode then still waits for `prefill_words_ms` of new speech)."""
        words = self._words_so_far
        if forget:
            self._words_so_far = None
        if words is not None and words.task is not None:
            words.task.cancel()

    def _take_live(self, item_id: str) -> _Live | None:
        live = self._live
        if live is None or live.item_id != item_id:
            return None
        self.drop_live()  # no partial result may arrive after the final one
        return live

    def speculate(self, pcm16k: bytes) -> asyncio.Task:
        """Start transcribing a turn that may be over, before the silence wait confirms it."""
        return self._spawn(self._run(pcm16k), "stt-speculative")

    def start(self, item: Item, pcm16k: bytes, speculative: asyncio.Task | None = None) -> None:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending[item.id or ""] = future
        live = self._take_live(item.id or "")
        self._spawn(self._transcribe(item, pcm16k, speculative, future, live), f"stt-{item.id}")

    async def _transcribe(self, item: Item, pcm16k: bytes, speculative: asyncio.Task | None,
                          future: asyncio.Future[str], live: _Live | None = None) -> None:
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
            words = self._words(result.done)
            if live is not None:
                # Deltas were sent while the user spoke: the final decode only adds what follows.
                first = not live.stable.sent
                rest = live.stable.finish(words)
                words, text = live.stable.sent, live.stable.text
            else:
                text = result.done.text
            self.finished_at[item_id] = time.monotonic()
            while len(self.finished_at) > 64:  # items no response waited for
                self.finished_at.pop(next(iter(self.finished_at)))
            if item.content:
                item.content[0].transcript = text
            if report:
                if live is not None:
                    if rest:
                        self._emit_delta(item_id, rest, first)
                elif self._logprobs and words:
                    self._emit_delta(item_id, words, True)  # one delta, so its logprobs cover it
                else:
                    for delta in result.deltas:
                        self.s.emit(ev.TranscriptionDelta(item_id=item_id, content_index=0, delta=delta))
                self.s.emit(ev.TranscriptionCompleted(
                    item_id=item_id, content_index=0, transcript=text,
                    usage={"type": "duration", "seconds": round(result.done.duration_s, 3)},
                    logprobs=logprob_entries(words, True) if self._logprobs else None))
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
        self.drop_live()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
