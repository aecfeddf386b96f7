"""The outgoing WebRTC audio track: plays the engine's speech in real time and knows what was heard.

aiortc pulls one frame at a time from `recv()` and sends it at once, so the track itself sets the
pace: 20 ms frames of 48 kHz mono PCM16, each released when it is due on the monotonic clock,
silence when nothing is queued. The samples of a frame are picked only when it is due, so a
`clear()` (barge-in) takes effect on the very next frame, and the count of samples actually handed
to aiortc per item is exact: that count, not wall time, is what truncation on barge-in uses.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
from collections import OrderedDict, deque
from dataclasses import dataclass

import av
import numpy as np
import soxr
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from ..telemetry import AUDIO_FRAMES_DROPPED, AUDIO_FRAMES_LATE
from .output import OUTPUT_RATE, Cleared, PlaybackListener

log = logging.getLogger("openrealtime.player")

__all__ = ["PacedAudioTrack"]

RATE = 48_000  # what Opus carries; resampling here keeps aiortc's encoder from doing it per frame
FRAME_SAMPLES = 960  # 20 ms
_TIME_BASE = fractions.Fraction(1, RATE)
_SILENCE = bytes(FRAME_SAMPLES * 2)
# A consumer this late (a stalled event loop) skips ahead instead of sending a burst of frames
# that the receiver's jitter buffer would have to absorb as added latency.
_MAX_LAG_S = 3 * FRAME_SAMPLES / RATE
_FRAME_S = FRAME_SAMPLES / RATE
# Pacing health in /metrics, per transport (this track is WebRTC's), never per call: a late frame
# left recv() more than one frame after its slot, a dropped one is a slot skipped after a stall.
_LATE = AUDIO_FRAMES_LATE.labels(transport="webrtc")
_DROPPED = AUDIO_FRAMES_DROPPED.labels(transport="webrtc")
_ITEMS_KEPT = 64  # per-item played counters kept for truncation lookups
_CLEARED_KEPT = 32


@dataclass(slots=True, eq=False)
class _Response:
    id: str
    queued: int = 0  # samples (48 kHz) not yet sent
    started: bool = False
    finished: bool = False
    last_item: str = ""


@dataclass(slots=True, eq=False)
class _Segment:
    response: _Response
    item_id: str
    samples: np.ndarray  # int16, 48 kHz
    pos: int = 0


@dataclass(slots=True, eq=False)
class _Resampling:
    """Which item the streaming resampler is in the middle of (it holds ~30 ms of its tail)."""

    response: _Response
    item_id: str


class PacedAudioTrack(MediaStreamTrack):
    """An aiortc audio track that implements the engine's `AudioOutput`.

    Listener contract: a response that had audio queued gets `playback_started` when its first
    frame leaves `recv()` and, once `finish`ed and drained, `playback_stopped`. A cleared response
    gets no `playback_stopped`, and later `play()` calls for it are dropped (a late TTS chunk must
    not resurrect audio the caller interrupted). A response that never had audio gets no callbacks.
    Callbacks run inside `recv()`, on the event loop, never inside the engine's own calls.
    """

    kind = "audio"

    def __init__(self, in_rate: int = OUTPUT_RATE, quality: str = "HQ") -> None:
        super().__init__()
        self.listener: PlaybackListener | None = None
        self._resampler = soxr.ResampleStream(in_rate, RATE, 1, dtype="int16", quality=quality)
        self._resampling: _Resampling | None = None
        self._queue: deque[_Segment] = deque()
        self._responses: dict[str, _Response] = {}  # had audio, not yet stopped or cleared
        self._cleared: deque[str] = deque(maxlen=_CLEARED_KEPT)
        self._played: OrderedDict[str, int] = OrderedDict()  # item id -> samples sent
        self._pending_stops: list[_Response] = []  # finished after their last frame went out
        self._start: float | None = None
        self._pts = 0

    # ------------------------------------------------------------------ AudioOutput

    def play(self, response_id: str, item_id: str, pcm16: bytes) -> None:
        """Queue 24 kHz mono PCM16 for `item_id`; never blocks (resampling costs microseconds)."""
        if self.readyState != "live" or response_id in self._cleared:
            return
        samples = np.frombuffer(pcm16, dtype="<i2", count=len(pcm16) // 2)
        if not samples.size:
            return
        response = self._responses.get(response_id)
        if response is None:
            response = self._responses[response_id] = _Response(response_id)
        elif response.finished:
            log.warning("audio for response %s after finish() is dropped", response_id)
            return
        response.last_item = item_id
        if item_id not in self._played:
            self._played[item_id] = 0
            while len(self._played) > _ITEMS_KEPT:
                self._played.popitem(last=False)
        current = self._resampling
        if current is not None and (current.response is not response or current.item_id != item_id):
            # Each item is resampled as one stream, so its output has exactly its input's duration
            # and played_ms maps 1:1 onto the item's own audio.
            self._flush_resampler()
        if self._resampling is None:
            self._resampling = _Resampling(response, item_id)
        self._enqueue(response, item_id, self._resampler.resample_chunk(samples))

    def finish(self, response_id: str) -> None:
        """Flush the resampler's tail; `playback_stopped` follows once everything was sent."""
        response = self._responses.get(response_id)
        if response is None or response.finished:
            return
        if self._resampling is not None and self._resampling.response is response:
            self._flush_resampler()
        response.finished = True
        if response.queued == 0:
            if response.started:
                # Its last frame is already out: report from the next recv(), not from inside the
                # engine's own call.
                self._pending_stops.append(response)
            else:  # only possible if resampling produced nothing at all
                self._responses.pop(response.id, None)

    def clear(self) -> Cleared | None:
        """Drop everything queued; the next frame is silence. None when nothing was playing."""
        head = self._queue[0] if self._queue else None
        if head is not None:
            response, item_id = head.response, head.item_id
        else:
            # An underrun mid-response (the TTS is behind) still counts as playing; a response
            # whose last frame is out only awaits its `playback_stopped`, which it keeps.
            unfinished = [r for r in self._responses.values() if not r.finished]
            if not unfinished:
                return None
            response = unfinished[0]
            item_id = response.last_item
        done = self._pending_stops[:]
        for rid in self._responses:
            if all(rid != r.id for r in done):
                self._cleared.append(rid)
        self._reset()
        for r in done:
            self._responses[r.id] = r
        self._pending_stops.extend(done)
        return Cleared(response.id, item_id, self.played_ms(item_id))

    def played_ms(self, item_id: str) -> int:
        """Milliseconds of `item_id` handed to aiortc so far (0 for unknown or forgotten items)."""
        return self._played.get(item_id, 0) * 1000 // RATE

    @property
    def busy(self) -> bool:
        """True while audio is queued, or a response's audio has begun and is not finished and sent."""
        return bool(self._queue) or bool(self._responses)

    # ------------------------------------------------------------------ MediaStreamTrack

    async def recv(self) -> av.AudioFrame:
        """The next 20 ms frame, released when due (the track paces the RTP sender)."""
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._start is None:
            self._start = now
            self._pts = 0
        else:
            delay = self._start + self._pts / RATE - now
            if delay > 0:
                await asyncio.sleep(delay)
                if self.readyState != "live":
                    raise MediaStreamError
            elif delay < -_MAX_LAG_S:
                # Skip the frames we missed; the pts jump tells the receiver about the gap.
                skipped_to = int((now - self._start) * RATE) // FRAME_SAMPLES * FRAME_SAMPLES
                _DROPPED.inc(max(0, skipped_to - self._pts) // FRAME_SAMPLES)
                self._pts = skipped_to
            elif delay < -_FRAME_S:
                _LATE.inc()
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(self._next_samples())
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = _TIME_BASE
        self._pts += FRAME_SAMPLES
        return frame

    def stop(self) -> None:
        """End the track (call closed): drop queued audio; no callbacks from now on."""
        self._reset()
        self.listener = None
        super().stop()

    # ------------------------------------------------------------------ internals

    def _next_samples(self) -> bytes:
        """Fill one frame from the queue and fire the callbacks it caused, in order."""
        events: list[tuple[bool, str]] = [(False, r.id) for r in self._pending_stops]
        for response in self._pending_stops:
            self._responses.pop(response.id, None)
        self._pending_stops.clear()
        if not self._queue:
            data = _SILENCE
        else:
            out = np.zeros(FRAME_SAMPLES, dtype="<i2")
            filled = 0
            queue = self._queue
            while filled < FRAME_SAMPLES and queue:
                seg = queue[0]
                take = min(FRAME_SAMPLES - filled, seg.samples.size - seg.pos)
                out[filled:filled + take] = seg.samples[seg.pos:seg.pos + take]
                seg.pos += take
                filled += take
                response = seg.response
                response.queued -= take
                if seg.item_id in self._played:
                    self._played[seg.item_id] += take
                if not response.started:
                    response.started = True
                    events.append((True, response.id))
                if seg.pos >= seg.samples.size:
                    queue.popleft()
                if response.finished and response.queued == 0:
                    self._responses.pop(response.id, None)
                    events.append((False, response.id))
            data = out.tobytes()
        if events:
            self._notify(events)
        return data

    def _notify(self, events: list[tuple[bool, str]]) -> None:
        listener = self.listener
        if listener is None:
            return
        for started, response_id in events:
            try:
                if started:
                    listener.playback_started(response_id)
                else:
                    listener.playback_stopped(response_id)
            except Exception:  # a listener bug must not kill the media track
                log.exception("playback listener failed (%s %s)",
                              "started" if started else "stopped", response_id)

    def _enqueue(self, response: _Response, item_id: str, samples: np.ndarray) -> None:
        if samples.size:
            self._queue.append(_Segment(response, item_id, samples))
            response.queued += samples.size

    def _flush_resampler(self) -> None:
        current = self._resampling
        self._resampling = None
        if current is None:
            return
        tail = self._resampler.resample_chunk(np.zeros(0, dtype=np.int16), last=True)
        self._resampler.clear()
        self._enqueue(current.response, current.item_id, tail)

    def _reset(self) -> None:
        self._queue.clear()
        self._responses.clear()
        self._pending_stops.clear()
        self._resampling = None
        self._resampler.clear()
