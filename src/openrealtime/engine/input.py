"""The input audio buffer: resampling, noise reduction, turn detection, commits, speculative STT.

All audio is kept at 16 kHz PCM16 (what VAD and Whisper want). Positions are milliseconds of
input audio since the session started, which is what `audio_start_ms` / `audio_end_ms` mean on
the wire.

Caller audio flows: resampler (any rate -> 16 kHz) -> noise suppressor (when
``audio.input.noise_reduction`` is set and the server has one) -> the buffer, VAD and the turn
detector. With ``near_field`` noise reduction a level gate (``NearFieldGate``) sits between VAD
and the turn detector, so background talkers do not start turns. Turn detection is server_vad
(``VadTurnDetector``) or semantic_vad (``SemanticTurnDetector`` + the server's end-of-turn model,
run inline at each pause so the decision applies exactly at the audio it judged); without an
end-of-turn model semantic_vad falls back to a silence wait per eagerness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from ..audio.resample import StreamResampler
from ..protocol import events as ev
from ..protocol.events import new_id
from ..protocol.session import SemanticVad, ServerVad
from .gate import NearFieldGate
from .stats import ArrivalClock
from .turns import (
    SemanticTurnDetector,
    SilenceBegan,
    SpeechResumed,
    SpeechStarted,
    SpeechStopped,
    TurnCheck,
    VadTurnDetector,
)

if TYPE_CHECKING:
    from .session import RealtimeSession

log = logging.getLogger(__name__)

RATE = 16_000
BYTES_PER_MS = RATE * 2 // 1000
# Without an end-of-turn model (smart-turn not installed), semantic_vad waits this long after speech.
SEMANTIC_SILENCE_MS = {"low": 1500, "medium": 800, "auto": 800, "high": 500}
# Most audio one commit carries, which bounds the speech-to-text work a client can cause per turn:
# the hosted API's 15 MiB input buffer at 24 kHz PCM16 (~5.5 min). A manual (turn_detection: null)
# buffer drops its oldest audio beyond it; under turn detection a turn that long is ended there.
MAX_BUFFER_MS = 15 * 1024 * 1024 * 1000 // (24_000 * 2)


def _ms_to_bytes(ms: float) -> int:
    return int(ms * RATE / 1000) * 2


class InputAudio:
    """Owns the session's input buffer and turn detector."""

    def __init__(self, session: RealtimeSession):
        self.s = session
        self.buf = bytearray()
        self.buf_start_ms = 0.0  # stream position of buf[0]
        self.total_ms = 0.0  # stream position of the end of buf
        self._arrivals = ArrivalClock()  # when audio arrived, to date the end of speech for /metrics
        self._resamplers: dict[int, StreamResampler] = {}
        vad = session.ctx.vad
        self._vad_stream = vad.new_stream() if vad is not None else None
        self._vad_pos_ms = 0.0
        self._detector: VadTurnDetector | None = None
        self._speech_item_id: str | None = None
        self._speech_start_ms = 0
        self._speculation: tuple[int, asyncio.Task] | None = None
        self._noise_stream = None  # a NoiseStream while noise_reduction is on
        self._noise_kind: str | None = None
        self._noise_carry = b""  # held-back samples of a suppressor that was switched off
        self._gate: NearFieldGate | None = None
        self._warned_no_turn_model = False
        self.configure()

    # ------------------------------------------------------------------ config

    def configure(self) -> None:
        """Apply the session's current turn_detection and noise_reduction (after every session.update)."""
        self._configure_noise()
        td = self.s.config.audio.input.turn_detection
        if td is None or self._vad_stream is None:
            if self._detector is not None and self._detector.in_speech:
                self._cancel_speculation()
            self._detector = None
            return
        old = self._detector
        frame_ms = self.s.ctx.vad.frame_ms  # type: ignore[union-attr]
        if isinstance(td, SemanticVad) and self.s.ctx.turn_detector is not None:
            if isinstance(old, SemanticTurnDetector):
                old.reconfigure_eagerness(td.eagerness)
                return
            detector: VadTurnDetector = SemanticTurnDetector(td.eagerness, frame_ms,
                                                             speculate_ms=self.s.ctx.speculate_after_ms)
        else:
            if isinstance(td, SemanticVad) and not self._warned_no_turn_model:
                self._warned_no_turn_model = True
                log.warning("semantic_vad without an end-of-turn model (install pipecat-ai for smart-turn): "
                            "using a silence wait per eagerness")
            threshold, silence = self._params(td)
            if old is not None and type(old) is VadTurnDetector:
                old.reconfigure(threshold, silence)
                return
            detector = VadTurnDetector(threshold, silence, frame_ms, self.s.ctx.speculate_after_ms)
        if old is None:
            self._vad_pos_ms = self.total_ms
        else:  # switched type: the turn in progress (if any) carries on under the new rules
            detector.adopt(old)
        self._detector = detector

    def _configure_noise(self) -> None:
        nr = self.s.config.audio.input.noise_reduction
        near = nr is not None and nr.type == "near_field" and self.s.ctx.vad is not None
        if not near:
            self._gate = None
        elif self._gate is None:
            self._gate = NearFieldGate(self.s.ctx.vad.frame_ms)  # type: ignore[union-attr]
        kind = nr.type if nr is not None and self.s.ctx.noise is not None else None
        if kind == self._noise_kind:
            return
        if self._noise_stream is not None:
            self._noise_carry += self._noise_stream.flush()
        self._noise_kind = kind
        self._noise_stream = self.s.ctx.noise.new_stream(kind) if kind is not None else None  # type: ignore[union-attr]

    @staticmethod
    def _params(td: ServerVad | SemanticVad) -> tuple[float, int]:
        if isinstance(td, ServerVad):
            return td.threshold, td.silence_duration_ms
        return 0.5, SEMANTIC_SILENCE_MS[td.eagerness]

    @property
    def turn_detection_enabled(self) -> bool:
        return self._detector is not None

    # ------------------------------------------------------------------ audio in

    async def append(self, pcm16: bytes, rate: int) -> None:
        """Add caller audio at any rate; runs turn detection on it."""
        arrived = time.monotonic()
        resampler = self._resamplers.get(rate)
        if resampler is None:
            resampler = self._resamplers[rate] = StreamResampler(rate, RATE)
        pcm = resampler.process(pcm16)
        if self._noise_carry:
            pcm, self._noise_carry = self._noise_carry + pcm, b""
        if self._noise_stream is not None and pcm:
            pcm = await self._noise_stream.process(pcm)
        if not pcm:
            return
        self.buf.extend(pcm)
        self.total_ms += len(pcm) / BYTES_PER_MS
        self._arrivals.note(self.total_ms, arrived)
        if self._detector is not None and self._vad_stream is not None:
            probs = await self._vad_stream.process(pcm)
            for prob in probs:
                start = self._vad_pos_ms
                self._vad_pos_ms += self._detector.frame_ms
                if self._gate is not None:
                    prob = self._gate.feed(prob, self._mean_square(start, self._vad_pos_ms),
                                           self._detector.in_speech)
                for event in self._detector.feed(prob, start):
                    await self._on_turn_event(event)
                if self._detector is None:  # a handler turned detection off
                    break
                if self._detector.in_speech and self._vad_pos_ms - self._speech_start_ms >= MAX_BUFFER_MS:
                    # Endless "speech" (noise, a stuck mic): the turn ends at the buffer's size.
                    log.info("session %s: a turn reached %d ms of speech; ending it there", self.s.id,
                             MAX_BUFFER_MS)
                    self._detector.reset()
                    await self._on_turn_event(SpeechStopped(int(self._vad_pos_ms), int(self._vad_pos_ms)))
            self._partial_transcript()
        self._trim()

    def _partial_transcript(self) -> None:
        """Let the transcriber decode the utterance so far (it decides when): for deltas in
        transcription sessions, for the LLM's prefill in realtime ones.

        Not in a pause: the speculative decode of the turn so far is running then.
        """
        item_id = self._speech_item_id
        if item_id is None or not self.speaking or self._speculation is not None:
            return
        start = self._speech_start_ms - self._padding()
        partial = self.s.transcriber.partial if self.s.config.type == "transcription" \
            else self.s.transcriber.partial_words
        partial(item_id, self.total_ms - self._speech_start_ms, lambda: self.segment(start, self.total_ms))

    def _mean_square(self, start_ms: float, end_ms: float) -> float:
        frame = np.frombuffer(self.segment(start_ms, end_ms), dtype="<i2").astype(np.float64)
        return float(np.mean(frame * frame)) if frame.size else 0.0

    def _trim(self) -> None:
        if self._detector is not None and not self._detector.in_speech:
            td = self.s.config.audio.input.turn_detection
            keep_ms = (td.prefix_padding_ms if isinstance(td, ServerVad) else 300) + 100
        elif self._detector is None:
            keep_ms = MAX_BUFFER_MS
        else:
            return
        excess = len(self.buf) - _ms_to_bytes(keep_ms)
        if excess > 0:
            del self.buf[:excess]
            self.buf_start_ms += excess / BYTES_PER_MS

    def segment(self, start_ms: float, end_ms: float) -> bytes:
        a = max(0, _ms_to_bytes(start_ms - self.buf_start_ms))
        b = max(a, _ms_to_bytes(end_ms - self.buf_start_ms))
        return bytes(self.buf[a:b])

    def drop_until(self, ms: float) -> None:
        cut = min(len(self.buf), max(0, _ms_to_bytes(ms - self.buf_start_ms)))
        del self.buf[:cut]
        self.buf_start_ms += cut / BYTES_PER_MS

    def take_all(self) -> bytes:
        """Everything buffered, for a manual commit; the buffer is emptied.

        The streaming resamplers hold back a few ms of filter delay; flush them so a commit
        includes every sample the client sent.
        """
        for rate, resampler in list(self._resamplers.items()):
            tail = resampler.flush()
            self.buf.extend(tail)
            self.total_ms += len(tail) / BYTES_PER_MS
            self._resamplers[rate] = StreamResampler(rate, RATE)
        # The suppressor's held-back few ms (unprocessed) and anything left by a switched-off one.
        tail = self._noise_carry + (self._noise_stream.flush() if self._noise_stream is not None else b"")
        self._noise_carry = b""
        self.buf.extend(tail)
        self.total_ms += len(tail) / BYTES_PER_MS
        data = bytes(self.buf)
        self.buf_start_ms = self.total_ms
        self.buf.clear()
        return data

    def clear(self) -> None:
        self.take_all()
        self._cancel_speculation()
        if self._detector is not None:
            self._detector.reset()
        self._speech_item_id = None
        self.s.transcriber.drop_live()

    @property
    def speaking(self) -> bool:
        return self._detector is not None and self._detector.in_speech

    def buffered_ms(self) -> int:
        return len(self.buf) // BYTES_PER_MS

    # ------------------------------------------------------------------ turns

    async def _on_turn_event(self, event: object) -> None:
        td = self.s.config.audio.input.turn_detection
        if isinstance(event, SpeechStarted):
            self._speech_item_id = new_id("item")
            self._speech_start_ms = event.start_ms
            self.s.emit(ev.InputAudioBufferSpeechStarted(audio_start_ms=event.start_ms,
                                                         item_id=self._speech_item_id))
            await self.s.on_user_speech(interrupt=bool(td and td.interrupt_response))
            if self._speech_item_id is not None and self.s.config.type == "realtime":
                self.s.prefill.start_turn()  # while the user speaks, the LLM reads up to their words
        elif isinstance(event, TurnCheck):
            await self._check_turn(event)
        elif isinstance(event, SilenceBegan):
            if self._speech_item_id is None:  # the turn was already committed
                return
            self._cancel_speculation()
            self.s.transcriber.drop_words(forget=False)  # the decode at the pause goes first
            pcm = self.segment(self._speech_start_ms - self._padding(), event.speech_end_ms)
            self._speculation = (event.speech_end_ms, self.s.transcriber.speculate(pcm))
            if self.s.config.type == "realtime":  # a transcription session never prompts the LLM
                self.s.prefill.start(self._speculation[1],
                                     semantic=isinstance(self._detector, SemanticTurnDetector))
        elif isinstance(event, SpeechResumed):
            self._cancel_speculation()
        elif isinstance(event, SpeechStopped):
            now = time.monotonic()
            speech_end = self._arrivals.when(event.speech_end_ms)
            self.s.turn_marks = {"speech_stopped": now,
                                 "speculative_stt": float(self._speculation is not None),
                                 # the origin of the stage latencies in /metrics (engine/stats.py)
                                 "speech_end": min(now, speech_end if speech_end is not None
                                                   else now - (event.end_ms - event.speech_end_ms) / 1000)}
            item_id = self._speech_item_id or new_id("item")
            self._speech_item_id = None
            self.s.transcriber.drop_words()
            self.s.emit(ev.InputAudioBufferSpeechStopped(audio_end_ms=event.end_ms, item_id=item_id))
            pcm = self.segment(self._speech_start_ms - self._padding(), event.end_ms)
            self.drop_until(event.end_ms)
            speculative = None
            if self._speculation is not None and self._speculation[0] == event.speech_end_ms:
                speculative = self._speculation[1]
                self._speculation = None
                self.s.prefill.turn_committed()
            self._cancel_speculation()
            self.s.commit_audio(pcm, item_id, speculative)
            if td is not None and td.create_response:
                self.s.request_auto_response()

    async def _check_turn(self, check: TurnCheck) -> None:
        """Run the end-of-turn model on the turn so far and let the detector decide (inline: the next
        frames wait ~30-70 ms, so the decision applies exactly where the model looked)."""
        detector, model = self._detector, self.s.ctx.turn_detector
        if not isinstance(detector, SemanticTurnDetector) or model is None:
            return
        pcm = self.segment(self._speech_start_ms - self._padding(), check.at_ms)
        t0 = time.perf_counter()
        try:
            prob = await model.predict(pcm)
        except Exception:
            log.exception("end-of-turn model failed; the turn ends at the eagerness' maximum wait")
            return
        log.debug("end-of-turn check at %d ms (%s): P(complete)=%.3f in %.0f ms", check.at_ms,
                  "first" if check.first else "re-check", prob, (time.perf_counter() - t0) * 1000)
        if self._detector is not detector or self.s.closed:  # reconfigured or closed meanwhile
            return
        for event in detector.decide(check, prob):
            await self._on_turn_event(event)

    def _padding(self) -> int:
        td = self.s.config.audio.input.turn_detection
        return td.prefix_padding_ms if isinstance(td, ServerVad) else 300

    def _cancel_speculation(self) -> None:
        if self._speculation is not None:
            self._speculation[1].cancel()
            self._speculation = None
            self.s.prefill.cancel()

    async def close(self) -> None:
        if self._speculation is not None:
            task = self._speculation[1]
            self._cancel_speculation()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
