"""PacedAudioTrack: real-time pacing, exact played-ms accounting, clear, and listener callbacks."""

from __future__ import annotations

import asyncio
import fractions
import time
from typing import Any

import av
import numpy as np
import pytest
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from openrealtime.audio.output import AudioOutput, Cleared
from openrealtime.audio.player import FRAME_SAMPLES, RATE, PacedAudioTrack
from openrealtime.config import IceConfig, Settings
from openrealtime.transports.webrtc import CallManager, frame_to_mono_pcm16

from .test_webrtc_unit import ScriptedSession, _ctx, _stock_client_fallback


class Recorder:
    """A PlaybackListener that records callbacks in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def playback_started(self, response_id: str) -> None:
        self.events.append(("started", response_id))

    def playback_stopped(self, response_id: str) -> None:
        self.events.append(("stopped", response_id))


def tone(ms: int, rate: int = 24_000, freq: float = 440.0) -> bytes:
    t = np.arange(rate * ms // 1000) / rate
    return (np.sin(2 * np.pi * freq * t) * 8000).astype("<i2").tobytes()


def samples(frame: av.AudioFrame) -> np.ndarray:
    return np.frombuffer(bytes(frame.planes[0]), dtype="<i2")[: frame.samples]


def track_with_listener() -> tuple[PacedAudioTrack, Recorder]:
    track = PacedAudioTrack()
    listener = Recorder()
    track.listener = listener
    return track, listener


async def pull_until(track: PacedAudioTrack, listener: Recorder, event: tuple[str, str],
                     limit: int = 200) -> list[av.AudioFrame]:
    frames = []
    while event not in listener.events:
        assert len(frames) < limit, listener.events
        frames.append(await track.recv())
    return frames


def test_implements_the_engine_protocol() -> None:
    assert isinstance(PacedAudioTrack(), AudioOutput)


async def test_frames_are_paced_in_real_time() -> None:
    track = PacedAudioTrack()
    stamps, frames = [], []
    for _ in range(26):
        frames.append(await track.recv())
        stamps.append(time.monotonic())
    elapsed = stamps[-1] - stamps[0]  # 25 intervals of 20 ms
    assert 0.45 <= elapsed < 0.9, elapsed
    gaps = np.diff(stamps)
    assert (gaps > 0.01).sum() >= 20, gaps  # paced, not a burst
    assert [f.pts for f in frames] == [i * FRAME_SAMPLES for i in range(26)]
    assert all(f.samples == FRAME_SAMPLES and f.sample_rate == RATE for f in frames)
    assert all(f.format.name == "s16" and f.layout.name == "mono" for f in frames)
    track.stop()


async def test_a_stalled_consumer_resyncs_instead_of_bursting() -> None:
    track = PacedAudioTrack()
    for _ in range(3):
        await track.recv()
    await asyncio.sleep(0.3)  # 15 frames late
    first = await track.recv()  # immediately, but the pts skips the missed frames
    assert first.pts >= 15 * FRAME_SAMPLES
    start = time.monotonic()
    for _ in range(5):
        await track.recv()
    assert time.monotonic() - start >= 0.08  # no catch-up burst
    track.stop()


async def test_silence_when_idle() -> None:
    track, listener = track_with_listener()
    for _ in range(5):
        assert not samples(await track.recv()).any()
    assert not track.busy and track.clear() is None and listener.events == []
    track.stop()


async def test_played_ms_counts_what_was_sent() -> None:
    track, _ = track_with_listener()
    track.play("resp_1", "item_1", tone(1000))
    assert track.busy and track.played_ms("item_1") == 0
    for k in range(1, 11):
        frame = await track.recv()
        assert samples(frame).any()
        assert track.played_ms("item_1") == k * 20
    assert track.played_ms("item_unknown") == 0
    track.stop()


async def test_clear_mid_item() -> None:
    track, listener = track_with_listener()
    track.play("resp_1", "item_1", tone(1000))
    for _ in range(7):
        await track.recv()
    cleared = track.clear()
    assert cleared == Cleared("resp_1", "item_1", 140)
    assert not samples(await track.recv()).any()
    assert not track.busy and track.played_ms("item_1") == 140
    track.play("resp_1", "item_1", tone(200))  # a late chunk of the interrupted response
    track.finish("resp_1")
    for _ in range(3):
        assert not samples(await track.recv()).any()
    assert listener.events == [("started", "resp_1")]  # never "stopped" after a clear
    assert track.clear() is None
    track.stop()


async def test_clear_during_an_underrun_still_reports_the_response() -> None:
    track, listener = track_with_listener()
    track.play("resp_1", "item_1", tone(60))
    for _ in range(5):
        await track.recv()  # drained, but the response is not finished: more audio may come
    assert track.busy
    assert track.clear() == Cleared("resp_1", "item_1", track.played_ms("item_1"))
    assert 20 <= track.played_ms("item_1") <= 60
    assert not track.busy and listener.events == [("started", "resp_1")]
    track.stop()


async def test_callbacks_for_two_consecutive_responses() -> None:
    track, listener = track_with_listener()
    track.play("resp_1", "item_1", tone(110))  # not a whole number of frames: one frame has both
    track.finish("resp_1")
    track.play("resp_2", "item_2", tone(50))
    track.play("resp_2", "item_2", tone(50))
    first = await track.recv()
    assert samples(first).any() and listener.events == [("started", "resp_1")]
    await pull_until(track, listener, ("stopped", "resp_1"))
    assert listener.events[:2] == [("started", "resp_1"), ("stopped", "resp_1")]
    assert track.busy  # resp_2 is queued but not finished
    track.finish("resp_2")
    await pull_until(track, listener, ("stopped", "resp_2"))
    assert listener.events == [("started", "resp_1"), ("stopped", "resp_1"),
                               ("started", "resp_2"), ("stopped", "resp_2")]
    assert track.played_ms("item_1") == 110 and track.played_ms("item_2") == 100
    assert not track.busy
    assert not samples(await track.recv()).any()
    track.stop()


async def test_finish_after_the_audio_drained_stops_on_the_next_frame() -> None:
    track, listener = track_with_listener()
    track.play("resp_1", "item_1", tone(100))
    for _ in range(8):
        await track.recv()
    assert listener.events == [("started", "resp_1")]
    track.finish("resp_1")  # flushes the resampler's tail: a few more ms to play
    await pull_until(track, listener, ("stopped", "resp_1"), limit=3)
    assert track.played_ms("item_1") == 100 and not track.busy
    track.stop()


@pytest.mark.parametrize("chunk", [480, 333, 24_000])
async def test_resampling_preserves_duration(chunk: int) -> None:
    track, listener = track_with_listener()
    pcm = tone(1000)
    for i in range(0, len(pcm), chunk * 2):
        track.play("resp_1", "item_1", pcm[i:i + chunk * 2])
    track.finish("resp_1")
    frames = await pull_until(track, listener, ("stopped", "resp_1"))
    assert track.played_ms("item_1") == 1000
    audio = np.concatenate([samples(f) for f in frames])
    assert len(frames) == 50
    # Same tone, twice the sample rate: the level matches and the pitch is still 440 Hz.
    assert abs(np.sqrt(np.mean(audio[2000:46000].astype(float) ** 2)) - 8000 / np.sqrt(2)) < 300
    spectrum = np.abs(np.fft.rfft(audio[:RATE]))  # one second: 1 Hz per bin
    assert abs(int(np.argmax(spectrum)) - 440) <= 2
    track.stop()


async def test_two_items_in_one_response_are_counted_apart() -> None:
    track, listener = track_with_listener()
    track.play("resp_1", "item_a", tone(30))
    track.play("resp_1", "item_b", tone(50))
    track.finish("resp_1")
    await pull_until(track, listener, ("stopped", "resp_1"))
    assert (track.played_ms("item_a"), track.played_ms("item_b")) == (30, 50)
    assert listener.events == [("started", "resp_1"), ("stopped", "resp_1")]
    track.stop()


async def test_a_failing_listener_does_not_break_the_track() -> None:
    class Broken:
        def playback_started(self, response_id: str) -> None:
            raise RuntimeError("boom")

        def playback_stopped(self, response_id: str) -> None:
            raise RuntimeError("boom")

    track = PacedAudioTrack()
    track.listener = Broken()
    track.play("resp_1", "item_1", tone(40))
    track.finish("resp_1")
    for _ in range(4):
        await track.recv()
    assert track.played_ms("item_1") == 40 and not track.busy
    track.stop()


async def test_stop_ends_the_track() -> None:
    track, listener = track_with_listener()
    track.play("resp_1", "item_1", tone(500))
    await track.recv()
    pending = asyncio.ensure_future(track.recv())
    await asyncio.sleep(0)
    track.stop()
    with pytest.raises(MediaStreamError):
        await pending
    with pytest.raises(MediaStreamError):
        await track.recv()
    assert not track.busy and listener.events == [("started", "resp_1")]
    track.play("resp_2", "item_2", tone(100))  # ignored once ended
    assert not track.busy


def test_play_never_blocks() -> None:
    track = PacedAudioTrack()
    start = time.perf_counter()
    for _ in range(100):
        track.play("resp_1", "item_1", tone(200))
    assert time.perf_counter() - start < 0.5
    assert track.busy
    track.stop()


# ----------------------------------------------------------------------------- the WebRTC transport


def _frame(data: np.ndarray, fmt: str, layout: str, rate: int = 48_000) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
    frame.sample_rate = rate
    return frame


def test_caller_frames_become_mono_pcm16() -> None:
    left = np.arange(-480, 480, dtype=np.int16) * 30
    right = left // 3
    want = ((left.astype(np.int32) + right) // 2).astype("<i2").tobytes()
    packed = np.stack([left, right], axis=1).reshape(1, -1)  # aiortc's Opus decoder output
    assert frame_to_mono_pcm16(_frame(packed, "s16", "stereo")) == want
    assert frame_to_mono_pcm16(_frame(np.stack([left, right]), "s16p", "stereo")) == want
    assert frame_to_mono_pcm16(_frame(left.reshape(1, -1), "s16", "mono", 16_000)) == left.tobytes()
    floats = np.stack([left, left]).astype(np.float32) / 32768
    assert frame_to_mono_pcm16(_frame(floats, "fltp", "stereo")) == left.tobytes()
    assert frame_to_mono_pcm16(_frame(floats.T.reshape(1, -1).copy(), "flt", "stereo")) == left.tobytes()


class ToneTrack(MediaStreamTrack):
    """A microphone playing a 440 Hz tone in real time."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pts = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        await asyncio.sleep(max(0.0, self._start + self._pts / RATE - loop.time()))
        t = (self._pts + np.arange(FRAME_SAMPLES)) / RATE
        frame = _frame((np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16).reshape(1, -1), "s16", "mono")
        frame.pts, frame.time_base = self._pts, fractions.Fraction(1, RATE)
        self._pts += FRAME_SAMPLES
        return frame


class ListeningSession(ScriptedSession):
    """A scripted session that takes caller audio and records playback callbacks."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.audio_output: Any = None
        self.pushed: list[tuple[bytes, int]] = []
        self.started = asyncio.Event()

    async def start(self) -> None:
        if self.audio_output is not None:  # assigned before start(), as the engine expects
            self.audio_output.listener = self
        await super().start()

    async def push_audio(self, pcm16: bytes, sample_rate: int) -> None:
        self.pushed.append((pcm16, sample_rate))

    def playback_started(self, response_id: str) -> None:
        self.started.set()

    def playback_stopped(self, response_id: str) -> None:
        pass


async def test_call_carries_audio_both_ways() -> None:
    settings = Settings(ice=IceConfig(addresses=["127.0.0.1"], gather_interfaces=False))
    manager = CallManager(settings, _ctx(), session_factory=ListeningSession)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(ToneTrack())
    pc.createDataChannel("oai-events")
    _stock_client_fallback(pc)
    try:
        await pc.setLocalDescription(await pc.createOffer())
        call = await manager.create_call(pc.localDescription.sdp)
        session = call.session
        assert isinstance(session.audio_output, PacedAudioTrack)
        assert session.audio_output is call.outgoing_audio and session.audio_output.listener is session
        await pc.setRemoteDescription(RTCSessionDescription(call.answer_sdp, "answer"))
        received = pc.getReceivers()[0].track
        session.audio_output.play("resp_1", "item_1", tone(1500, freq=300))
        session.audio_output.finish("resp_1")
        levels = []
        async with asyncio.timeout(10):
            while len(levels) < 100:
                frame = await received.recv()
                levels.append(float(np.sqrt(np.mean(frame.to_ndarray().astype(float) ** 2))))
        assert session.started.is_set() and max(levels) > 2000, levels  # our speech, through Opus
        for _ in range(100):
            if len(session.pushed) >= 25:
                break
            await asyncio.sleep(0.05)
        assert {rate for _, rate in session.pushed} == {48_000}
        assert all(len(pcm) >= 1920 for pcm, _ in session.pushed)  # >= 20 ms, mono PCM16
        mic = np.frombuffer(b"".join(pcm for pcm, _ in session.pushed[5:]), dtype="<i2")
        assert 3000 < np.sqrt(np.mean(mic.astype(float) ** 2)) < 8000  # the tone, not doubled
        await manager.hangup(call.id)
        assert call.outgoing_audio.readyState == "ended"
    finally:
        await pc.close()
        await manager.close()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("rtc_")]


async def test_a_client_that_receives_no_audio_gets_no_player() -> None:
    settings = Settings(ice=IceConfig(addresses=["127.0.0.1"], gather_interfaces=False))
    manager = CallManager(settings, _ctx(), session_factory=ListeningSession)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver(ToneTrack(), direction="sendonly")  # a mic, but nothing played back
    _stock_client_fallback(pc)
    try:
        await pc.setLocalDescription(await pc.createOffer())
        call = await manager.create_call(pc.localDescription.sdp)
        assert "a=recvonly" in call.answer_sdp
        assert call.session.audio_output is None  # no track would ever pull the player's frames
        await pc.setRemoteDescription(RTCSessionDescription(call.answer_sdp, "answer"))
        for _ in range(100):
            if len(call.session.pushed) >= 3:
                break
            await asyncio.sleep(0.05)
        assert len(call.session.pushed) >= 3  # the caller is still heard
    finally:
        await pc.close()
        await manager.close()
